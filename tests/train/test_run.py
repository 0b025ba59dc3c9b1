"""The one loop (`train.run.Run`) with a task of a few lines: what a new training method gets
without writing a loop (schedule, metrics, evaluation, checkpoints, exact resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import TrainConfig
from lmforge.errors import TrainingInterrupted
from lmforge.train.checkpoint import TrainableCheckpoints
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at
from lmforge.train.run import Run


class LineFit:
    """Fit y = 3x - 1 from noisy samples; batch `index` is drawn from a generator seeded by it."""

    tokens_per_batch = 32

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        x = torch.randn(32, 1, generator=g)
        return {"x": x, "y": 3 * x - 1 + 0.01 * torch.randn(32, 1, generator=g)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["x"]), batch["y"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        b = self.batch(10**6)
        return {"val_loss": self.loss(model, b).item(), "val_slope": model.weight.item()}


def fit(run_dir, interrupt_at=None, resume=False):
    tc = TrainConfig(lr=0.3, warmup=2, max_steps=40, weight_decay=0.0, checkpoint_every=10, log_every=10,
                     device="cpu", dtype="float32")
    lines = []
    with Run.open(tc, run_dir, parallel=False, eval_every=20, log=lines.append, progress=False,
                  interrupt_at=interrupt_at) as run:
        torch.manual_seed(0)
        model = nn.Linear(1, 1)
        run.prepare(model)
        run.start("task: line\n", TrainableCheckpoints(run_dir, model, None, keep=2), resume)
        end = run.fit(LineFit(), model)
    return model, end, lines


def test_a_task_of_a_few_lines_trains_logs_evaluates_and_checkpoints(tmp_path):
    model, end, _ = fit(tmp_path / "run")
    assert end.steps == 40 and end.tokens == 40 * 32 and end.stop_reason == "max_steps"
    assert abs(model.weight.item() - 3) < 0.25 and abs(model.bias.item() + 1) < 0.25, (model.weight, model.bias)
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < 0.01 * train[0]["loss"]
    tc = TrainConfig(lr=0.3, warmup=2, max_steps=40)
    assert [r["lr"] for r in train] == [lr_at(s - 1, tc) for s in (10, 20, 30, 40)]  # the shared schedule
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 40] and val[-1]["val_slope"] == pytest.approx(model.weight.item())
    assert end.val == {k: v for k, v in val[-1].items() if k != "step"}
    assert (tmp_path / "run" / "recipe.yaml").read_text() == "task: line\n"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000030", "step-000040"]
    assert (tmp_path / "run" / "latest").resolve().name == "step-000040"


def test_an_interrupted_and_resumed_task_ends_with_the_uninterrupted_weights(tmp_path):
    straight, _, _ = fit(tmp_path / "straight")
    with pytest.raises(TrainingInterrupted) as info:
        fit(tmp_path / "cut", interrupt_at=7)
    assert info.value.step == 7 and info.value.checkpoint.name == "step-000007"
    resumed, end, lines = fit(tmp_path / "cut", resume=True)
    assert any("resuming" in line and "step 7" in line for line in lines)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert end.steps == 40 and end.tokens == 40 * 32
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(20) == 2  # the training record and the validation
