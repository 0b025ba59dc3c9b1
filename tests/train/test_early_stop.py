"""Early stopping on validation loss (train.early_stop_patience, train.early_stop_min_delta):
the run ends cleanly at the right evaluation, says why, and keeps the best checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.errors import TrainingInterrupted
from lmforge.eval.perplexity import EvalResult
from lmforge.train import lm
from lmforge.train.early_stop import EarlyStopping
from lmforge.train.metrics import read_metrics
from lmforge.train.recovery import verify_checkpoint
from lmforge.train.trainer import train


def test_the_tracker_counts_validations_without_improvement():
    early = EarlyStopping(patience=2, min_delta=0.05)
    assert early.update(10, 3.0) and not early.should_stop
    assert not early.update(20, 2.97)  # better, but by less than min_delta
    assert early.update(30, 2.9) and early.bad_evals == 0  # more than min_delta below the best
    assert not early.update(40, 2.95) and not early.should_stop
    assert not early.update(50, 2.9) and early.should_stop
    assert (early.best_step, early.best_loss) == (30, 2.9)
    assert early.reason() == "validation loss did not improve by more than 0.05 in 2 evaluations (best 2.9000 at step 30)"
    copy = EarlyStopping(patience=2, min_delta=0.05)
    copy.restore(early.state())
    assert copy.should_stop and copy.best_step == 30
    off = EarlyStopping(patience=0)
    for step in range(10):
        off.update(step, 1.0)
    assert not off.should_stop


@pytest.fixture
def scripted_validation(monkeypatch):
    """The validation losses a run sees, in order (then the last one again): the loop's decisions
    are tested on known numbers, with real training steps and checkpoints around them."""

    def script(losses):
        seen = iter(losses)

        def evaluate_split(*args, **kwargs):
            loss = next(seen, losses[-1])
            return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=loss, tokens=1)

        monkeypatch.setattr(lm, "evaluate_split", evaluate_split)

    return script


def test_pretraining_stops_after_patience_validations_and_keeps_the_best(tiny_recipe, scripted_validation):
    scripted_validation([5.0, 4.0, 4.2, 4.1, 3.0])
    lines = []
    recipe = tiny_recipe("early", train={"max_steps": 40, "checkpoint_every": 100, "keep_checkpoints": 1,
                                         "early_stop_patience": 2}, eval={"every": 2})
    result = train(recipe, progress=False, log=lines.append)
    run_dir = result.run_dir
    # validations at steps 2, 4 (best), 6, 8: two without improvement, so the run ends at step 8
    assert result.steps == 8 and result.val.loss == 4.1
    assert [r["step"] for r in read_metrics(run_dir) if "val_loss" in r] == [2, 4, 6, 8]
    assert any(line.startswith("early stop at step 8: validation loss did not improve by more than 0 in 2 "
                               "evaluations (best 4.0000 at step 4)") for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["steps"] == 8
    assert summary["best"] == {"step": 4, "val_loss": 4.0, "checkpoint": str(run_dir / "checkpoints" / "step-000004")}
    assert "best 4.0000 at step 4" in summary["stop_detail"]
    # the best checkpoint survives pruning (keep_checkpoints 1) and `best` points at it
    assert (run_dir / "best").resolve().name == "step-000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000004") is None
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_an_interrupted_run_counts_on_after_resume(tiny_recipe, scripted_validation):
    sections = {"train": {"max_steps": 40, "checkpoint_every": 100, "early_stop_patience": 2}, "eval": {"every": 2}}
    scripted_validation([5.0, 4.0, 4.2])
    with pytest.raises(TrainingInterrupted):
        train(tiny_recipe("early", **sections), progress=False, log=lambda *_: None, interrupt_at=7)
    scripted_validation([4.1])  # the validation at step 8, after the resume
    result = train(tiny_recipe("early", **sections), progress=False, log=lambda *_: None, resume=True)
    assert result.steps == 8  # the evaluations at 6 (before) and 8 (after) count together
    assert json.loads((result.run_dir / "summary.json").read_text())["best"]["step"] == 4


def test_without_patience_the_run_goes_to_max_steps(tiny_recipe, scripted_validation):
    scripted_validation([5.0, 6.0, 7.0, 8.0])
    result = train(tiny_recipe("no-early", train={"max_steps": 10}, eval={"every": 2}), progress=False,
                   log=lambda *_: None)
    assert result.steps == 10
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "max_steps" and "best" not in summary
    assert not (result.run_dir / "best").exists()
