"""Pipeline parallelism on CPU processes (gloo): `train.parallel pp` (GPipe, 1F1B, interleaved 1F1B)
on 2 processes and `fsdp+pp` on 4 (2 pipelines x 2 stages) train to one process's losses and weights
on the same global batch; their checkpoints hold each stage's tensors under the full model's names
and reshard to and from one process, DDP, FSDP+PP and TP with identical continuation; a process
makes only its stages' weights, as one process draws them; what a pipeline (or a trainer other
than pretraining, under a model-parallel layout) cannot run is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train import pipeline_parallel
from lmforge.train.distributed import DistContext
from tests.train.test_distributed import latest, losses, torchrun, train_here, weights

pytestmark = pytest.mark.slow

# Weights and losses of a pipeline equal one process's up to float rounding: the same sums,
# grouped by microbatch and stage instead of all at once.
TOLERANCE = 1e-5


def overrides(root: Path, name: str, parallel: str = "auto", **train_keys) -> dict:
    return {
        "model": {"family": "llama", "n_layer": 4, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32},
        "data": {"corpus": "synthetic", "dir": str(root / "data"), "tokenizer": {"vocab_size": 300}},
        "train": {"batch_size": 8, "max_steps": 6, "warmup": 2, "checkpoint_every": 100, "log_every": 1,
                  "parallel": parallel, "dtype": "float32", **train_keys},
        "eval": {"every": 3, "batches": 1},
        "run": {"name": name, "out": str(root / "runs")},
    }


def val_losses(root: Path, name: str) -> list[float]:
    import json

    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["val_loss"] for x in lines if '"val_loss"' in x]


def assert_same_training(root: Path, name: str) -> None:
    one, other = weights(root, "single"), weights(root, name)
    assert one.keys() == other.keys()
    assert max((one[k] - other[k]).abs().max().item() for k in one) < TOLERANCE
    assert losses(root, name) == pytest.approx(losses(root, "single"), abs=TOLERANCE)
    assert val_losses(root, name) == pytest.approx(val_losses(root, "single"), abs=TOLERANCE)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    train_here(overrides(root, "single"))
    return root


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_two_process_pipeline_equals_one_process(single, schedule):
    name = f"pp-{schedule}"
    torchrun(single, overrides(single, name, "pp", pp_schedule=schedule))
    assert_same_training(single, name)
    # Each process wrote its own blocks under the full model's names (interleaved: 4 stages of one
    # block, process 0 runs stages 0 and 2); the tied output layer is the embedding (stage 0's), written once.
    meta = FileSystemReader(latest(single, name) / "dcp").read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    first, second = ([0, 2], [1, 3]) if schedule == "interleaved" else ([0, 1], [2, 3])
    assert files["model.tok_emb.weight"] == {"__0_0.distcp"}
    assert all(files[f"model.blocks.{i}.attn.qkv.weight"] == {"__0_0.distcp"} for i in first)
    assert all(files[f"model.blocks.{i}.attn.qkv.weight"] == {"__1_0.distcp"} for i in second)
    assert files["model.norm_f.weight"] == {"__1_0.distcp"}
    assert "model.lm_head.weight" not in files and "optimizer.state.lm_head.weight.exp_avg" not in files


def test_compiled_stages_train_to_one_process(single, monkeypatch):
    """train.compile under pp: each stage runs compiled (inductor writes its kernels to the cache
    directory the test gives it) and the run still equals one uncompiled process."""
    cache = single / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torchrun(single, overrides(single, "pp-compiled", "pp", compile=True))
    assert_same_training(single, "pp-compiled")
    assert any(cache.rglob("*.py")), "nothing was compiled"


def test_fsdp_plus_pipeline_on_four_processes_equals_one(single):
    torchrun(single, overrides(single, "fsdp-pp", "fsdp+pp", pp_size=2), nproc=4)
    assert_same_training(single, "fsdp-pp")
    meta = FileSystemReader(latest(single, "fsdp-pp") / "dcp").read_metadata()
    # stage 0's embedding is sharded over its 2 dp ranks (0 and 1); stage 1's blocks over ranks 2 and 3
    files: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    assert files["model.tok_emb.weight"] == {"__0_0.distcp", "__1_0.distcp"}
    assert files["model.blocks.3.mlp.up.weight"] == {"__2_0.distcp", "__3_0.distcp"}


def test_pipeline_checkpoints_reshard_to_one_process_and_back(single):
    ov = overrides(single, "pp-1-pp", "pp")
    torchrun(single, ov, interrupt_at=2)
    train_here(ov, resume=True, interrupt_at=4)  # one process reads both stages' parts
    assert (latest(single, "pp-1-pp") / "model.safetensors").is_file()
    torchrun(single, ov, resume=True)  # each stage reads its part of a one-process checkpoint
    assert_same_training(single, "pp-1-pp")


def test_ddp_checkpoint_resumes_under_fsdp_plus_pipeline_and_back(single):
    ov = overrides(single, "ddp-fpp-ddp", "ddp")
    torchrun(single, ov, interrupt_at=2)
    ov["train"]["parallel"] = "fsdp+pp"
    torchrun(single, ov, nproc=4, resume=True, interrupt_at=4)
    ov["train"]["parallel"] = "ddp"
    torchrun(single, ov, resume=True)
    assert_same_training(single, "ddp-fpp-ddp")


def test_pipeline_checkpoint_resumes_under_tensor_parallel_and_back(single):
    """pp (2) -> tp (2) -> pp (2): tensor parallelism reads the stages' tensors (its fused rows
    reordered from the full-model layout), and the pipeline reads the tp ranks' shards."""
    ov = overrides(single, "pp-tp-pp", "pp")
    torchrun(single, ov, interrupt_at=2)
    ov["train"]["parallel"] = "tp"
    torchrun(single, ov, resume=True, interrupt_at=4)
    ov["train"]["parallel"] = "pp"
    torchrun(single, ov, resume=True)
    assert_same_training(single, "pp-tp-pp")


def test_stages_split_by_layer_count():
    assert [list(pipeline_parallel.stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(pipeline_parallel.stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]


def context(world: int, **train_keys) -> DistContext:
    tc = TrainConfig(**{"batch_size": 8, "parallel": "pp", **train_keys})
    return pipeline_parallel.pipeline_context(DistContext(rank=0, world=world, strategy=tc.parallel), tc)


def refusal(call) -> str:
    with pytest.raises(LmforgeError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_what_a_pipeline_cannot_run_is_one_line(make_model, tmp_path):
    ctx = context(4, parallel="fsdp+pp")  # 2 pipelines x 2 stages x 2 microbatches per pipeline's 4 rows
    assert (ctx.pp_size, ctx.dp_world, ctx.microbatches, ctx.rows(8)) == (2, 2, 4, slice(0, 4))
    rank3 = pipeline_parallel.pipeline_context(DistContext(rank=3, world=4, strategy="fsdp+pp"),
                                               TrainConfig(batch_size=8, parallel="fsdp+pp"))
    assert (rank3.stage, rank3.dp_rank, rank3.rows(8)) == (1, 1, slice(4, 8))  # stages are consecutive ranks
    assert "does not divide the 6 processes" in refusal(lambda: context(6, parallel="fsdp+pp", pp_size=4))
    assert "one pipeline of all 4 processes" in refusal(lambda: context(4, pp_size=2))
    assert "use a multiple of 8" in refusal(lambda: context(4, parallel="fsdp+pp", pp_microbatches=4, batch_size=12))
    assert "interleaved runs under train.parallel pp only" in refusal(
        lambda: context(4, parallel="fsdp+pp", pp_schedule="interleaved"))
    assert "does not suit the interleaved schedule" in refusal(
        lambda: context(2, pp_schedule="interleaved", pp_microbatches=5, batch_size=10))

    tc = TrainConfig(batch_size=8, parallel="pp")
    four_stages = context(4)
    assert "fewer than the 4 pipeline stages (4 processes x 1)" in refusal(
        lambda: pipeline_parallel.Pipeline(make_model(n_layer=2), tc, four_stages, torch.device("cpu")))

    interleaved = TrainConfig(batch_size=8, parallel="pp", pp_schedule="interleaved")
    assert "fewer than the 4 pipeline stages (2 processes x 2)" in refusal(
        lambda: pipeline_parallel.Pipeline(make_model(n_layer=3), interleaved, context(2), torch.device("cpu")))

    from lmforge.train.run import Run, TaskStep

    run = Run(tc, tmp_path, context(2), torch.device("cpu"), eval_every=10)
    model = make_model(n_layer=2)
    assert "pipelines pretraining only" in refusal(lambda: run.parallelize(model, TaskStep(None, model)))


@pytest.mark.parametrize("stages_of", [[[0], [1]], [[0, 2], [1, 3]]], ids=["2 stages", "interleaved"])
def test_each_process_keeps_only_its_stages_and_they_compose_to_the_model(make_model, stages_of):
    """Split in one process: every parameter kept by exactly one process (the tied output layer's
    copy aside), under its full-model name, and the stages run in order give the model's output."""
    import copy

    whole = make_model(n_layer=4)
    x = torch.randint(0, whole.config.vocab, (2, 8))
    n_stages = sum(len(s) for s in stages_of)
    processes = [copy.deepcopy(whole) for _ in stages_of]
    parts = {}
    for model, stages in zip(processes, stages_of):
        for stage, part in zip(stages, pipeline_parallel.keep_stages(model, stages, n_stages)):
            parts[stage] = part
    names = [set(dict(model.named_parameters())) for model in processes]
    assert set.union(*names) == set(dict(whole.named_parameters())) | {"lm_head.weight"}
    assert sum(len(n) for n in names) == len(set.union(*names))  # no name on two processes
    assert {"tok_emb.weight", "blocks.0.attn.qkv.weight"} <= names[0] and "norm_f.weight" not in names[0]
    assert {"lm_head.weight", "norm_f.weight", "blocks.3.mlp.down.weight"} <= names[-1]
    assert pipeline_parallel.tied_copy(processes[-1]) and not pipeline_parallel.tied_copy(processes[0])
    h = x
    for stage in range(n_stages):
        h = parts[stage](h)
    with torch.no_grad():
        assert torch.allclose(processes[-1].lm_head(h), whole(x), atol=1e-6)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("llama", {"tie_embeddings": False}), ("gpt2", {}),
                                              ("qwen3", {}), ("mixtral", {}), ("gemma3", {})],
                         ids=["llama-tied", "llama-untied", "gpt2", "qwen3", "mixtral", "gemma3"])
def test_a_process_makes_only_its_stages_with_the_weights_one_process_draws(family, overrides):
    """build_stage_model on every process of 2 (and of 2 interleaved): its own parameters (and the
    RoPE tables) equal the whole model's from the same seed, the others stay on the meta device
    (no memory), and the generator ends where building the whole model leaves it."""
    from tests.conftest import tiny_config

    cfg = tiny_config(family, n_layer=4, **overrides)
    torch.manual_seed(7)
    reference = Transformer(cfg)
    whole, tables = dict(reference.named_parameters()), dict(reference.named_buffers())
    after = torch.get_rng_state()
    for schedule in ("1f1b", "interleaved"):
        tc = TrainConfig(batch_size=8, parallel="pp", pp_schedule=schedule)
        made: set[str] = set()
        for rank in range(2):
            ctx = pipeline_parallel.PipelineContext(rank, 2, rank, "pp", pp_size=2, microbatches=4)
            torch.manual_seed(7)
            model = pipeline_parallel.build_stage_model(cfg, tc, ctx, torch.device("cpu"))
            assert torch.equal(torch.get_rng_state(), after)
            mine = {n: p for n, p in model.named_parameters() if not p.is_meta}
            assert mine and all(torch.equal(p, whole[n]) for n, p in mine.items())
            assert bool(tables) == cfg.uses_rope  # RoPE's tables, where the family has them
            assert all(torch.equal(b, tables[n]) for n, b in model.named_buffers())
            stages, n_stages = pipeline_parallel.process_stages(tc, ctx)
            pipeline_parallel.keep_stages(model, stages, n_stages)
            assert not any(p.is_meta for p in model.parameters())  # what the stages keep is all real
            made |= set(mine)
        assert made == set(whole)


@pytest.mark.parametrize("layout", ["tp", "fsdp+tp", "pp", "fsdp+pp"])
def test_trainers_that_cannot_run_a_model_parallel_layout_refuse_it_at_start(layout, lmforge_main, tmp_path,
                                                                           monkeypatch):
    """Fine-tuning (every task) refuses the layout when its config is read, before torchrun is
    launched or a model loaded; distillation refuses torchrun and a student recipe that asks for
    the layout; fsdp+pp refuses train.compile (compiling FSDP2-sharded stages is not tried)."""
    from lmforge.compress.distill import build_student
    from lmforge.train.finetune import load_finetune_config

    raw = {"base": str(tmp_path / "base"), "data": {"train": str(tmp_path / "chat.jsonl")}, "task": "classify",
           "train": {"parallel": layout}}
    splits = "pipelines" if layout.endswith("pp") else "shards"
    assert f"train.parallel {layout} {splits} pretraining only" in refusal(lambda: load_finetune_config(None, raw))
    # the command line (in this process, from tmp_path): one line, exit 2, nothing launched
    monkeypatch.chdir(tmp_path)
    code, out, err = lmforge_main("finetune", "lora-sft", "--data", "chat.jsonl", "--train.parallel", layout,
                                  "--nproc", "2")
    assert code == 2 and "Traceback" not in err + out
    assert f"train.parallel {layout} {splits} pretraining only" in err + out

    student = tmp_path / "student.yaml"
    student.write_text(f"model: {{family: llama, n_layer: 2, d_model: 32, n_head: 4}}\ntrain: {{parallel: {layout}}}\n")
    assert f"sets train.parallel {layout}, but lmforge distill trains on one process" in refusal(
        lambda: build_student(str(student), 300))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = lmforge_main("distill", "--teacher", "teacher", "--student", str(student), "--data", "data",
                                  "--out", "out")
    lines = (err + out).strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not under torchrun" in lines[0], lines
    assert not (tmp_path / "out").exists()
    if layout == "fsdp+pp":
        assert "train.compile compiles pipeline stages under train.parallel pp only, not fsdp+pp" in refusal(
            lambda: context(4, parallel=layout, compile=True, pp_size=2))
