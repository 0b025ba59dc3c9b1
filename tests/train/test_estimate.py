"""`lmforge estimate`: its parameter counts are the model's, its weights/gradients/AdamW bytes are
the real tensors' after an optimizer step, its activations are what autograd saves (tensor by
tensor) and its peak is near the CPU allocator's measured peak; the batch it suggests fits the
budget; the command prints a table and JSON, and refuses bad input with one line."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import ModelConfig, load_recipe
from lmforge.model import Transformer
from lmforge.train.estimate import (Estimator, Precision, block_bytes_per_token, copies_per_block, count_parameters,
                                    cpu_peak_bytes, parse_bytes, training_step)
from lmforge.train.optim import build_optimizer

CONFIGS = {
    "llama-gqa": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=32),
    "llama-untied": dict(family="llama", n_layer=3, n_head=4, d_model=48, context=16, tie_embeddings=False),
    "gpt2": dict(family="gpt2", n_layer=2, n_head=4, d_model=64, context=32),
    "qwen2-bias": dict(family="qwen2", n_layer=1, n_head=4, n_kv_head=1, d_model=64, context=32, d_ff=96),
    "qwen3-qknorm": dict(family="qwen3", n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=24, context=32),
    "gemma2": dict(family="gemma2", n_layer=2, n_head=2, n_kv_head=1, d_model=64, context=32, attn_softcap=50.0,
                   logit_softcap=30.0),
    "mixtral": dict(family="mixtral", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=32, n_experts=4,
                    experts_per_token=2, moe_d_ff=80),
    "qwen2-moe-shared": dict(family="qwen2_moe", n_layer=1, n_head=4, d_model=64, context=32, n_experts=3,
                             experts_per_token=1, moe_shared_d_ff=40),
}
VOCAB = 300


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_are_the_models(name):
    cfg = ModelConfig(vocab_size=VOCAB, **CONFIGS[name])
    model = Transformer(cfg)
    counted = count_parameters(cfg, VOCAB)
    assert counted.total == model.num_params()
    assert counted.embedding == model.num_params() - model.num_params(non_embedding=True)
    assert counted.per_block == sum(p.numel() for p in model.blocks[0].parameters())
    linear = [m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    assert counted.block_matmul == sum(m.weight.numel() for m in linear)


def test_weights_gradients_and_adamw_are_the_real_tensors_bytes():
    recipe = load_recipe("tiny", {"model": {"vocab_size": VOCAB, "tie_embeddings": False},
                                  "train": {"dtype": "float32"}})
    model = Transformer(recipe.model)
    optimizer = build_optimizer(model, recipe.train, torch.device("cpu"))
    x = torch.randint(0, VOCAB, (2, recipe.model.context))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    params = list(model.parameters())
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    memory = Estimator(recipe, VOCAB, "cpu", "float32", native_ok=True).estimate("ddp", 1).memory
    assert memory.weights == sum(p.numel() * p.element_size() for p in params)
    assert memory.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert memory.optimizer == sum(t.numel() * t.element_size() for t in moments)
    assert memory.extra == 0


def saved_bytes_of_one_block(cfg: ModelConfig, autocast: bool, batch: int = 2) -> tuple[int, int]:
    """(bytes of the new tensors block 0 saves for backward, of those the weight casts), by the
    saved-tensor hooks: each storage once, parameters and buffers (RoPE tables) left out."""
    model = Transformer(cfg)
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, tuple[int, bool]] = {}
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in known:
            is_weight = t.dim() == 2 and (tuple(t.shape) in weights or tuple(t.shape[::-1]) in weights) \
                and t.dtype == torch.bfloat16 and t.shape[0] != batch * cfg.context
            seen.setdefault(s.data_ptr(), (s.nbytes(), is_weight))
        return t

    T = cfg.context
    x = model.embed(torch.randint(0, cfg.vocab_size, (batch, T))).detach().requires_grad_()
    rope, mask, causal = model.layer_inputs(0, T, torch.float32, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.blocks[0](x, rope, None, 0, mask, causal)
    return sum(n for n, w in seen.values()), sum(n for n, w in seen.values() if w)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen3-qknorm", "gemma2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_block_activations_are_what_autograd_saves(name, autocast):
    cfg = ModelConfig(vocab_size=VOCAB, **CONFIGS[name])
    total, weight_casts = saved_bytes_of_one_block(cfg, autocast)
    p = Precision(2 if autocast else 4)
    tokens = 2 * cfg.context
    estimated = block_bytes_per_token(cfg, p) * tokens + copies_per_block(count_parameters(cfg, VOCAB), p)
    assert estimated == pytest.approx(total, rel=0.03)


def peak_and_estimate(overrides: dict) -> tuple[int, float]:
    recipe = load_recipe("quickstart", {"model": {"vocab_size": 1024}, **overrides})
    from lmforge import native
    from lmforge.train.precision import resolve_dtype

    dtype = resolve_dtype(torch.device("cpu"), recipe.train.dtype)
    est = Estimator(recipe, 1024, "cpu", dtype, native.elementwise() is not None).estimate("ddp", 1)
    torch.manual_seed(0)

    def two_steps():
        step = training_step(recipe, 1024)
        step()
        step()

    mem = est.memory_checkpointed if recipe.train.activation_checkpointing else est.memory
    return cpu_peak_bytes(two_steps), mem.total


@pytest.mark.slow
@pytest.mark.parametrize("train", [
    {"dtype": "float32", "batch_size": 8},
    {"dtype": "float32", "batch_size": 8, "activation_checkpointing": True},
    {"dtype": "bfloat16", "batch_size": 8, "loss_chunk": 256},
], ids=["fp32", "fp32-checkpointed", "bf16-chunked-loss"])
def test_peak_estimate_is_within_15_percent_of_the_measured_peak(train):
    measured, estimated = peak_and_estimate({"train": train})
    assert measured > 0
    assert abs(estimated - measured) / measured < 0.15, (estimated, measured)


@pytest.mark.slow
def test_pipeline_estimate_is_within_15_percent_of_both_stages_measured_peaks():
    """The benchmark's pipeline row (2 gloo processes, 1F1B, activation checkpointing, bf16 where the
    CPU has it): `lmforge train` under torchrun with the profiler on, each rank's peak inside its
    training steps against the estimate of the busier stage."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "estimate_memory.py"
    done = subprocess.run([sys.executable, str(bench), "--sizes", "small", "--layouts", "pp", "--checkpointing", "on"],
                          capture_output=True, text=True, timeout=600, cwd=bench.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = Path(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    (row,) = json.loads(results.read_text())
    assert len(row["peaks"]) == 2 and min(row["peaks"]) > 0
    assert abs(row["error"]) < 0.15, row


def test_suggested_batch_fits_the_budget_and_one_more_step_does_not():
    recipe = load_recipe("quickstart", {"train": {"grad_accum": 4}})
    est = Estimator(recipe, 2048, "cpu", "float32", native_ok=False)
    budget = parse_bytes("300MiB")
    for layout, nproc in (("ddp", 1), ("ddp", 2), ("fsdp", 2), ("pp", 2), ("tp", 2)):
        s = est.sizes(layout, nproc)
        unit = s["dp"] * s["microbatches"]
        sug = est.suggest(layout, nproc, budget)
        biggest = sug["largest_batch_size"]
        assert biggest % unit == 0 and biggest >= unit
        assert est.memory(layout, nproc, s, biggest / unit, False).total <= budget
        assert est.memory(layout, nproc, s, (biggest + unit) / unit, False).total > budget
        # the recipe's 32 x 4 rows per optimizer step, in batches that fit
        assert sug["batch_size"] <= biggest and sug["batch_size"] * sug["grad_accum"] >= 128
    # FSDP holds a shard of the state: at 2 processes it fits more rows per rank than DDP
    assert est.suggest("fsdp", 2, budget)["largest_batch_size"] >= est.suggest("ddp", 2, budget)["largest_batch_size"]
    assert est.suggest("ddp", 1, 1000)["batch_size"] == 0  # 1000 bytes: nothing fits


def test_memory_budget_sizes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("1e6") == 10**6


@pytest.mark.slow
def test_cli_json_and_table_for_tiny_with_a_probe(cli):
    proc = cli("estimate", "tiny", "--nproc", "2", "--probe-steps", "1", "--memory-budget", "64MiB", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    recipe = load_recipe("tiny", {"model": {"vocab_size": 512}})
    assert report["parameters"]["total"] == Transformer(recipe.model).num_params()
    assert report["vocab"] == 512 and report["nproc"] == 2 and report["memory_budget"] == 64 * 2**20
    rows = {r["layout"]: r for r in report["layouts"]}
    assert set(rows) == {"ddp", "fsdp", "tp", "fsdp+tp", "pp", "fsdp+pp"}
    assert report["probe"]["tokens_per_s"] > 0
    for name in ("ddp", "fsdp", "tp", "pp"):
        row = rows[name]
        assert row["valid"] and row["memory"]["total"] > 0
        assert row["memory_checkpointed"]["activations"] < row["memory"]["activations"]
        assert row["suggestion"]["batch_size"] >= 1 and row["tokens_per_s"] > 0
    assert rows["ddp"]["tokens_per_s"] == pytest.approx(2 * report["probe"]["tokens_per_s"])
    assert rows["fsdp"]["memory"]["weights"] == pytest.approx(rows["ddp"]["memory"]["weights"] / 2)
    assert not rows["fsdp+tp"]["valid"] and rows["fsdp+tp"]["reason"] == "needs 4+ processes"

    table = cli("estimate", "tiny", "--nproc", "2", "--no-probe", "--memory-budget", "64MiB")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    for expected in ("parameters", f"{report['parameters']['total']:,}", "memory per rank at 2 processes",
                     "ddp", "fsdp", "AdamW", "ckpt: activations", "batch x accum", "largest batch"):
        assert expected in text, expected


def test_cli_table_for_quickstart(cli):
    proc = cli("estimate", "quickstart", "--no-probe", "--layouts", "ddp,fsdp", "--nproc", "4",
               "--memory-budget", "1GiB", "--train.activation_checkpointing", "true")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    total = count_parameters(load_recipe("quickstart").model, 2048).total
    assert f"{total:,}" in text and "memory per rank at 4 processes, budget 1.00 GiB" in text


@pytest.mark.parametrize("args, message", [
    (("nope.yaml",), "does not exist"),
    (("tiny", "--layouts", "ddp,zero3"), "unknown layout zero3"),
    (("tiny", "--memory-budget", "lots"), "is not a size"),
    (("tiny", "--nproc", "0"), "--nproc must be at least 1"),
    (("tiny", "--train.batch_siz", "4"), "batch_siz"),
])
def test_cli_refuses_bad_input_with_one_line(lmforge_main, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = lmforge_main("estimate", *args, "--no-probe")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == ""


def test_a_layout_without_its_module_is_still_estimated_and_marked(monkeypatch):
    from lmforge.train import estimate

    monkeypatch.setitem(estimate.LAYOUT_MODULES, "pp", "lmforge.train.no_such_pipeline_module")
    recipe = load_recipe("tiny", {"model": {"vocab_size": VOCAB}})
    est = Estimator(recipe, VOCAB, "cpu", "float32", native_ok=False)
    pp, ddp = est.estimate("pp", 2), est.estimate("ddp", 2)
    assert not pp.wired and pp.valid and pp.memory.total > 0
    assert ddp.wired
    # a stage holds half the blocks; the busier one here is the first (the embedding, and 2
    # microbatches in flight under 1F1B against the last stage's 1)
    P = count_parameters(recipe.model, VOCAB)
    assert pp.memory.weights == 4 * (P.per_block + P.embedding)
    assert pp.memory.weights < ddp.memory.weights
