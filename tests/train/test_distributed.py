"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 equal one process on the
same global batch; their checkpoints are sharded (DCP, each rank its own part) and reshard
across world sizes and strategies (2 -> 1 -> 2, 1 -> 2 -> 2); any checkpoint exports to a
model directory; broken or foreign checkpoints are one clear error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.train.recovery import CHECKSUMS, verify_checkpoint
from lmforge.train.trainer import train

pytestmark = pytest.mark.slow

WORKER = """
import json, sys
from lmforge.config import load_recipe
from lmforge.errors import TrainingInterrupted
from lmforge.train.trainer import train
overrides, resume, interrupt_at = json.loads(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
try:
    train(load_recipe(None, overrides), resume=resume, progress=False, log=lambda *a: None, interrupt_at=interrupt_at)
except TrainingInterrupted:
    pass
"""


def overrides(root: Path, name: str, parallel: str = "auto", **train_keys) -> dict:
    return {
        "model": {"n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32},
        "data": {"corpus": "synthetic", "dir": str(root / "data"), "tokenizer": {"vocab_size": 300}},
        "train": {"batch_size": 4, "max_steps": 8, "warmup": 2, "checkpoint_every": 100, "log_every": 1,
                  "parallel": parallel, "dtype": "float32", **train_keys},
        "eval": {"every": 100, "batches": 1},
        "run": {"name": name, "out": str(root / "runs")},
    }


def torchrun(root: Path, ov: dict, resume: bool = False, interrupt_at: int | None = None, nproc: int = 2) -> None:
    script = root / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           json.dumps(ov), "1" if resume else "0", json.dumps(interrupt_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_here(ov: dict, resume: bool = False, interrupt_at: int | None = None) -> None:
    try:
        train(load_recipe(None, ov), resume=resume, progress=False, log=lambda *a: None, interrupt_at=interrupt_at)
    except TrainingInterrupted:
        assert interrupt_at is not None


def weights(root: Path, name: str) -> dict:
    return load_file(str(root / "runs" / name / "model" / "model.safetensors"))


def losses(root: Path, name: str) -> list[float]:
    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


def latest(root: Path, name: str) -> Path:
    return (root / "runs" / name / "latest").resolve()


def assert_sharded(ckpt: Path, per_rank_shards: bool) -> None:
    """A DCP checkpoint of 2 ranks: one shard file per rank, neither holding a full copy of the
    state; under FSDP each rank wrote its own half of every weight matrix."""
    from torch.distributed.checkpoint import FileSystemReader

    assert not (ckpt / "model.safetensors").exists() and (ckpt / "config.json").is_file()
    files = sorted(p.name for p in (ckpt / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    meta = FileSystemReader(ckpt / "dcp").read_metadata()
    # The output layer is the embedding matrix (tied): written once, under the embedding's name.
    assert "model.tok_emb.weight" in meta.state_dict_metadata
    assert "model.lm_head.weight" not in meta.state_dict_metadata
    written = {"__0_0.distcp": 0, "__1_0.distcp": 0}
    chunks: dict[str, list[str]] = {}
    for index, info in meta.storage_data.items():
        written[info.relative_path] += info.length
        chunks.setdefault(index.fqn, []).append(info.relative_path)
    total = sum(written.values())
    assert all(0.3 * total < n < 0.7 * total for n in written.values()), written
    for name, files_of in chunks.items():
        assert len(files_of) == len(set(files_of))  # no rank wrote the same piece twice
        if per_rank_shards and name.startswith("model.") and len(meta.state_dict_metadata[name].size) == 2:
            assert sorted(files_of) == ["__0_0.distcp", "__1_0.distcp"], name


def assert_export_equals(ckpt: Path, model_dir: Path, out: Path) -> None:
    from lmforge.train.checkpoint import export_checkpoint

    export_checkpoint(ckpt, out)
    exported, final = load_file(str(out / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert json.loads((out / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train_here(overrides(root, "single"))
    return root


@pytest.fixture(scope="module")
def two_process_runs(single):
    """DDP and FSDP2 runs of the same recipe on 2 processes, checkpointing every 3 steps, keeping 2."""
    for parallel in ("ddp", "fsdp"):
        torchrun(single, overrides(single, parallel, parallel, checkpoint_every=3, keep_checkpoints=2))
    return single


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(two_process_runs, parallel):
    root = two_process_runs
    assert_close(weights(root, "single"), weights(root, parallel))
    assert losses(root, "single") == pytest.approx(losses(root, parallel), abs=1e-5)
    # Sharded checkpoints at steps 3 and 6 (pruned) and 8, committed whole: no staging folders left.
    run = root / "runs" / parallel
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert latest(root, parallel).name == "step-000008"
    assert_sharded(latest(root, parallel), per_rank_shards=parallel == "fsdp")
    with pytest.raises(LmforgeError, match="export-checkpoint"):  # not a model directory, and load says so
        lmforge.load(latest(root, parallel))
    # The consolidated export of the last checkpoint is the model directory the run wrote.
    assert_export_equals(run, run / "model", root / f"export-{parallel}")


def test_fsdp_checkpoint_reshards_2_to_1_to_2(single):
    ov = overrides(single, "fsdp-2-1-2", "fsdp")
    torchrun(single, ov, interrupt_at=3)
    assert_sharded(latest(single, "fsdp-2-1-2"), per_rank_shards=True)
    train_here(ov, resume=True, interrupt_at=5)  # one process reads the 2 ranks' shards
    one_process = latest(single, "fsdp-2-1-2")
    assert one_process.name == "step-000005" and (one_process / "model.safetensors").is_file()
    torchrun(single, ov, resume=True)  # 2 FSDP ranks shard the one-process checkpoint
    assert_close(weights(single, "single"), weights(single, "fsdp-2-1-2"))
    assert losses(single, "single") == pytest.approx(losses(single, "fsdp-2-1-2"), abs=1e-5)


def test_one_process_checkpoint_resumes_on_two_then_changes_strategy(single):
    ov = overrides(single, "1-ddp-fsdp", "ddp")
    train_here(ov, interrupt_at=3)
    torchrun(single, ov, resume=True, interrupt_at=5)  # 1 -> 2 (DDP)
    assert_sharded(latest(single, "1-ddp-fsdp"), per_rank_shards=False)
    ov["train"]["parallel"] = "fsdp"
    torchrun(single, ov, resume=True)  # DDP's sharded checkpoint -> FSDP2 shards
    assert_close(weights(single, "single"), weights(single, "1-ddp-fsdp"))
    assert losses(single, "single") == pytest.approx(losses(single, "1-ddp-fsdp"), abs=1e-5)


def test_foreign_or_broken_sharded_checkpoint_is_one_clear_error(two_process_runs, tmp_path, make_model):
    import torch.distributed.checkpoint as dcp

    source = two_process_runs / "runs" / "fsdp"

    def copy_run(name: str) -> tuple[dict, Path]:
        shutil.copytree(source, tmp_path / "runs" / name, symlinks=True)
        # Without their checksums (as checkpoints written before those were recorded), so that the
        # damage below reaches the loader: with them, resume names the file and falls back first.
        for manifest in (tmp_path / "runs" / name / "checkpoints").glob(f"*/{CHECKSUMS}"):
            manifest.unlink()
        ov = overrides(two_process_runs, name, max_steps=10)
        ov["run"]["out"] = str(tmp_path / "runs")
        return ov, (tmp_path / "runs" / name / "latest").resolve()

    def resume_error(ov: dict) -> str:
        with pytest.raises(LmforgeError) as info:
            train_here(ov, resume=True)
        assert "\n" not in str(info.value)
        return str(info.value)

    ov, _ = copy_run("other-recipe")
    ov["model"]["n_layer"] = 3
    assert "different model than the recipe describes" in resume_error(ov)

    # config.json agrees with the recipe but the shards are of another model: DCP's shape check.
    ov, ckpt = copy_run("other-shards")
    shutil.rmtree(ckpt / "dcp")
    dcp.save({"model": make_model(d_model=48, vocab_size=300).state_dict()},
             storage_writer=dcp.FileSystemWriter(ckpt / "dcp"), no_dist=True)
    message = resume_error(ov)
    assert "does not fit this model or is corrupt" in message and "Size mismatch" in message

    ov, ckpt = copy_run("truncated")
    shard = ckpt / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "does not fit this model or is corrupt" in resume_error(ov)
    # the checksums recorded with the sharded checkpoint name that shard before anything is loaded
    original = (source / "latest").resolve()
    assert {line.split("  ")[1] for line in (original / CHECKSUMS).read_text().splitlines()} >= \
        {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer.pt", "config.json"}
    assert verify_checkpoint(original) is None
    assert verify_checkpoint(ckpt) is None  # no checksums here: the loader's check above is what is left
    shutil.copy(original / CHECKSUMS, ckpt / CHECKSUMS)
    assert verify_checkpoint(ckpt) == f"{shard} does not match the sha256 recorded when it was written"

    ov, ckpt = copy_run("no-metadata")
    (ckpt / "dcp" / ".metadata").unlink()
    assert "the checkpoint is incomplete" in resume_error(ov)
    with pytest.raises(LmforgeError, match="the checkpoint is incomplete"):
        from lmforge.train.checkpoint import export_checkpoint

        export_checkpoint(ckpt, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_failed_sharded_save_leaves_latest_alone(tmp_path, make_model, tokenizer, monkeypatch):
    """The sharded writer stages the whole checkpoint and renames it only when complete: a failure
    part-way leaves no step folder, no staging folder, and `latest` on the previous checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    from lmforge.train import checkpoint
    from lmforge.train.distributed import DistContext

    class OneRankSharded(DistContext):  # the DCP layout from one process (DCP then needs no process group)
        active = property(lambda self: True)

        def share(self, value):
            return value

        def barrier(self):
            pass

    model = make_model(vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters())
    run_dir, ctx = tmp_path / "run", OneRankSharded(world=2, strategy="ddp")
    first = checkpoint.save_checkpoint(run_dir, 1, model, optimizer, tokenizer, {"step": 1}, {}, 0, ctx)
    assert (first / "dcp" / ".metadata").is_file()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Fails inside DCP's writer (it serializes non-tensor state with torch.save), then after it.
    for where, raised in ((checkpoint.torch, CheckpointException), (checkpoint, OSError)):
        with monkeypatch.context() as patch:
            patch.setattr(where, "save" if where is checkpoint.torch else "write_config_files", fail)
            with pytest.raises(raised):
                checkpoint.save_checkpoint(run_dir, 2, model, optimizer, tokenizer, {"step": 2}, {}, 0, ctx)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
        assert checkpoint.latest_checkpoint(run_dir) == first

    # A save killed mid-write (no exception handler ran) leaves its staging folder; the next
    # committed checkpoint removes it.
    (run_dir / "checkpoints" / ".step-000002.tmp-killed" / "dcp").mkdir(parents=True)
    third = checkpoint.save_checkpoint(run_dir, 3, model, optimizer, tokenizer, {"step": 3}, {}, 0, ctx)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000003"]
    assert checkpoint.latest_checkpoint(run_dir) == third


def test_world_size_must_divide_batch(monkeypatch, tmp_path):
    from lmforge.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LmforgeError, match="not divisible by the 3 processes"):
        distributed.setup("auto", 4, "cpu")


def test_activation_checkpointing_trains_identically(tmp_path):
    """Recomputing activations changes memory, not arithmetic: same losses, same weights."""
    results = {}
    for name, ac in (("plain", False), ("checkpointed", True)):
        ov = overrides(tmp_path, name)
        ov["train"]["activation_checkpointing"] = ac
        train_here(ov)
        results[name] = weights(tmp_path, name)
    assert_close(results["plain"], results["checkpointed"], tol=1e-6)


def test_export_of_a_one_process_checkpoint(single, tmp_path):
    run = single / "runs" / "single"
    assert (latest(single, "single") / "model.safetensors").is_file()  # one process: a model directory
    assert_export_equals(run / "checkpoints" / "step-000008", run / "model", tmp_path / "export")
    with pytest.raises(LmforgeError, match="has no complete checkpoint yet"):
        from lmforge.train.checkpoint import export_checkpoint

        (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
        export_checkpoint(tmp_path / "empty-run", tmp_path / "never")
