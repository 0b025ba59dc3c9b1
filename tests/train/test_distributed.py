"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 equal one process on the
same global batch, and checkpoints reshard across world sizes (2 -> 1, 1 -> 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.train.trainer import TrainingInterrupted, train

pytestmark = pytest.mark.slow

WORKER = """
import json, sys
from lmforge.config import load_recipe
from lmforge.train.trainer import TrainingInterrupted, train
overrides, resume, interrupt_at = json.loads(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
try:
    train(load_recipe(None, overrides), resume=resume, progress=False, log=lambda *a: None, interrupt_at=interrupt_at)
except TrainingInterrupted:
    pass
"""


def overrides(root: Path, name: str, parallel: str = "auto") -> dict:
    return {
        "model": {"n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32},
        "data": {"corpus": "synthetic", "dir": str(root / "data"), "tokenizer": {"vocab_size": 300}},
        "train": {"batch_size": 4, "max_steps": 8, "warmup": 2, "checkpoint_every": 100, "log_every": 1,
                  "parallel": parallel},
        "eval": {"every": 100, "batches": 1},
        "run": {"name": name, "out": str(root / "runs")},
    }


def torchrun(root: Path, ov: dict, resume: bool = False, interrupt_at: int | None = None) -> None:
    script = root / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(ov), "1" if resume else "0", json.dumps(interrupt_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(root: Path, name: str) -> dict:
    return load_file(str(root / "runs" / name / "model" / "model.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train(load_recipe(None, overrides(root, "single")), progress=False, log=lambda *a: None)
    return root


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, parallel):
    torchrun(single, overrides(single, parallel, parallel))
    assert_close(weights(single, "single"), weights(single, parallel))
    losses = {}
    for name in ("single", parallel):
        lines = (single / "runs" / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert losses["single"] == pytest.approx(losses[parallel], abs=1e-5)


def test_fsdp_checkpoint_resumes_on_one_process(single):
    ov = overrides(single, "fsdp-2to1", "fsdp")
    torchrun(single, ov, interrupt_at=4)
    assert (single / "runs" / "fsdp-2to1" / "latest").resolve().name == "step-000004"
    train(load_recipe(None, ov), resume=True, progress=False, log=lambda *a: None)
    assert_close(weights(single, "single"), weights(single, "fsdp-2to1"))


def test_one_process_checkpoint_resumes_on_two(single):
    ov = overrides(single, "ddp-1to2", "ddp")
    with pytest.raises(TrainingInterrupted):
        train(load_recipe(None, ov), progress=False, log=lambda *a: None, interrupt_at=4)
    torchrun(single, ov, resume=True)
    assert_close(weights(single, "single"), weights(single, "ddp-1to2"))


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
        train(load_recipe(None, ov), progress=False, log=lambda *a: None)
        results[name] = weights(tmp_path, name)
    assert_close(results["plain"], results["checkpointed"], tol=1e-6)
