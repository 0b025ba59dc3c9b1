"""Tensor parallelism on 2 and 4 CPU processes (gloo): `tp` and `fsdp+tp` train to the weights,
losses and gradient norms of one process on the same global batch; their checkpoints (DCP, the
fused q/k/v and gate/up rows written at their places in the model's own layout) resume under
ddp, one process and back with the same continuation; bad layouts are refused in one line.

Tolerance: 1e-5 on weights after 8 AdamW steps and on each step's loss and gradient norm (the
sharded matmuls and all-reduces sum in another order than one process; measured differences
are ~1e-7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import assert_close, latest, losses, overrides, torchrun, train_here, weights

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.train import tensor_parallel
from lmforge.train.distributed import DistContext

pytestmark = pytest.mark.slow

TOL = 1e-5


def grad_norms(root: Path, name: str) -> list[float]:
    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["grad_norm"] for x in lines if '"grad_norm"' in x]


def assert_same_training(root: Path, name: str) -> None:
    assert_close(weights(root, "single"), weights(root, name), TOL)
    assert losses(root, name) == pytest.approx(losses(root, "single"), abs=TOL)
    assert grad_norms(root, name) == pytest.approx(grad_norms(root, "single"), abs=TOL)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    train_here(overrides(root, "single"))
    return root


@pytest.mark.parametrize("parallel,nproc", [("tp", 2), ("fsdp+tp", 4)])
def test_tensor_parallel_equals_one_process(single, parallel, nproc):
    name = parallel.replace("+", "-")
    torchrun(single, overrides(single, name, parallel), nproc=nproc)
    assert_same_training(single, name)
    ckpt = latest(single, name)
    meta = json.loads((ckpt / "lmforge.json").read_text())["checkpoint"]
    assert meta == {"format": "dcp", "world": nproc, "parallel": parallel, "step": 8}


def test_tp_checkpoint_resumes_under_ddp_tp_and_one_process(single):
    """tp (2) -> ddp (2) -> tp (2) -> one process: each reads the last one's checkpoint."""
    ov = overrides(single, "tp-chain", "tp")
    torchrun(single, ov, nproc=2, interrupt_at=3)
    ov["train"]["parallel"] = "ddp"
    torchrun(single, ov, nproc=2, resume=True, interrupt_at=5)
    ov["train"]["parallel"] = "tp"
    torchrun(single, ov, nproc=2, resume=True, interrupt_at=7)
    assert json.loads((latest(single, "tp-chain") / "lmforge.json").read_text())["checkpoint"]["parallel"] == "tp"
    train_here(ov, resume=True)  # one process reads the tp ranks' shards
    assert_same_training(single, "tp-chain")


def test_one_process_checkpoint_resumes_under_fsdp_tp_then_tp(single):
    """one process -> fsdp+tp (4: 2 x 2) -> tp (2)."""
    ov = overrides(single, "fsdp-tp-chain", "fsdp+tp")
    train_here(ov, interrupt_at=3)
    torchrun(single, ov, nproc=4, resume=True, interrupt_at=5)  # a whole model directory, reordered and sharded
    ov["train"]["parallel"] = "tp"
    torchrun(single, ov, nproc=2, resume=True)  # a 2-D (dp x tp) DCP checkpoint read by a 1-D tp mesh
    assert_same_training(single, "fsdp-tp-chain")


def test_fused_rows_reordered_and_back():
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=4, n_kv_head=2, vocab_size=64)
    qkv = torch.arange(float(cfg.n_head + 2 * cfg.kv_heads) * cfg.dim_head)[:, None].repeat(1, 3)
    order = tensor_parallel.shard_order(tensor_parallel.fused_segments(cfg)["blocks.0.attn.qkv.weight"], 2)
    # rank 0's half: q heads 0-1 (rows 0-15), kv head 0 of k (32-39) and of v (48-55)
    assert order[:32].tolist() == [*range(0, 16), *range(32, 40), *range(48, 56)]
    state = {"blocks.0.attn.qkv.weight": qkv, "tok_emb.weight": torch.ones(64, 32)}
    there = tensor_parallel.tp_layout(state, cfg, 2)
    assert torch.equal(there["blocks.0.attn.qkv.weight"], qkv[order]) and there["tok_emb.weight"] is state["tok_emb.weight"]
    back = tensor_parallel.true_layout({"state": {"blocks.0.attn.qkv.weight": {"exp_avg": qkv[order]}}}, cfg, 2)
    assert torch.equal(back["state"]["blocks.0.attn.qkv.weight"]["exp_avg"], qkv)


def tc(parallel: str, **keys) -> TrainConfig:
    return TrainConfig(parallel=parallel, **{"batch_size": 4, **keys})


@pytest.mark.parametrize("parallel,world,keys,message", [
    ("tp", 4, {"tp_size": 2}, "train.parallel tp splits the model over all 4 processes, but train.tp_size is 2"),
    ("fsdp+tp", 4, {"tp_size": 3}, "train.tp_size 3 does not divide the 4 processes"),
    ("fsdp+tp", 8, {"tp_size": 2, "batch_size": 6}, "train.batch_size 6 does not split over 4 data-parallel groups"),
    ("fsdp+tp", 4, {"tp_size": 2, "batch_size": 3}, "train.batch_size 3 does not split over 2 data-parallel groups"),
    ("tp", 2, {"loss_chunk": 64}, "train.loss_chunk is not used with tensor parallelism"),
])
def test_bad_layouts_are_one_line(parallel, world, keys, message):
    with pytest.raises(LmforgeError, match=message) as info:
        tensor_parallel.tensor_parallel_context(DistContext(0, world, 0, parallel), tc(parallel, **keys))
    assert "\n" not in str(info.value)


def test_grid_rows():
    ctx = tensor_parallel.tensor_parallel_context(DistContext(3, 4, 3, "fsdp+tp"), tc("fsdp+tp"))
    assert (ctx.tp_size, ctx.dp_rank, ctx.rows(8)) == (2, 1, slice(4, 8))  # ranks 2, 3: the second half
    ctx = tensor_parallel.tensor_parallel_context(DistContext(1, 2, 1, "tp"), tc("tp"))
    assert ctx.rows(8) == slice(0, 8)  # tp: every rank the whole batch
    ctx = tensor_parallel.tensor_parallel_context(DistContext(1, 4, 1, "tp"), tc("tp", batch_size=1))
    assert ctx.rows(1) == slice(0, 1)  # a batch smaller than the processes is fine: it is not split


@pytest.mark.parametrize("model,message", [
    ({"n_head": 4, "n_kv_head": 2}, "model has 2 key/value heads, not divisible by tp_size 4"),
    ({"family": "mixtral", "n_head": 4, "n_experts": 4, "experts_per_token": 2}, "does not split mixture-of-experts"),
])
def test_models_that_do_not_split_are_one_line(model, message):
    cfg = ModelConfig(n_layer=1, d_model=32, vocab_size=64, **model)
    with pytest.raises(LmforgeError, match=message):
        tensor_parallel.check_model(cfg, 4)


def test_fine_tuning_is_refused_under_tp(tmp_path):
    from lmforge.train.run import Run, TaskStep

    run = Run(TrainConfig(parallel="tp"), tmp_path, DistContext(0, 2, 0, "tp"), torch.device("cpu"), eval_every=10)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(LmforgeError, match="train.parallel tp shards pretraining only"):
        run.parallelize(model, TaskStep(None, model))


FAMILIES = """
import json, sys, torch, torch.distributed as dist, torch.nn.functional as F
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train import tensor_parallel as tpm
dist.init_process_group("gloo")
world, out = dist.get_world_size(), {}
for family in sys.argv[1].split(","):
    cfg = ModelConfig(family=family, n_layer=2, d_model=32, n_head=4, context=16, vocab_size=64,
                      **({} if family == "gpt2" else {"n_kv_head": 2}))
    torch.manual_seed(0)
    ref = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    ref_loss.backward()
    tpm.parallelize(model, tpm.mesh_of(world, world, torch.device("cpu")))
    with tpm.loss_context(True):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
    grads = tpm.true_layout({n: p.grad.full_tensor() for n, p in model.named_parameters()}, cfg, world)
    out[family] = {"loss": abs(loss.full_tensor().item() - ref_loss.item()),
                   "grad": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
                   "sharded": sorted({type(p).__name__ for p in model.parameters()})}
if dist.get_rank() == 0:
    print(json.dumps(out))
dist.destroy_process_group()
"""


def test_families_split_as_one_process(tmp_path):
    """Tied embeddings, biases and learned positions (gpt2), q/k/v biases (qwen2), per-head q/k
    norms (qwen3: their gradients summed over the ranks' heads), soft-capping, post-norms and
    sliding layers (gemma3): loss and every gradient equal one process's on 2 ranks."""
    script = tmp_path / "families.py"
    script.write_text(FAMILIES)
    families = ["gpt2", "qwen2", "qwen3", "gemma3"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), ",".join(families)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(families)
    for family, r in result.items():
        assert r["loss"] < TOL and r["grad"] < TOL, (family, r)
        assert r["sharded"] == ["DTensor"], family  # every parameter on the mesh


def test_fsdp_tp_accumulating_and_recomputing_equals_one_process(single):
    """fsdp+tp (2 x 2) with train.grad_accum 2 (FSDP's gradient sync on the last micro-step only)
    and activation checkpointing (each block's forward, collectives included, rerun in backward)."""
    keys = {"grad_accum": 2, "max_steps": 4}
    train_here(overrides(single, "single-accum", **keys))
    torchrun(single, overrides(single, "fsdp-tp-accum", "fsdp+tp", activation_checkpointing=True, **keys), nproc=4)
    assert_close(weights(single, "single-accum"), weights(single, "fsdp-tp-accum"), TOL)
    assert losses(single, "fsdp-tp-accum") == pytest.approx(losses(single, "single-accum"), abs=TOL)
