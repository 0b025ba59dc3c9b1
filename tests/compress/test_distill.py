"""Distillation: the loss, its falling, the student improving, top-k caching, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.compress.distill import (DistillConfig, distill, distill_loss, matched_layers, run_distill,
                                      summarize_teacher)
from lmforge.errors import LmforgeError


def test_distill_loss_is_cross_entropy_at_alpha_zero_and_zero_kl_for_the_teacher_itself():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    full = summarize_teacher(logits, 2.0, 0)
    assert torch.allclose(distill_loss(logits, targets, full, 2.0, 0.0), ce)
    assert distill_loss(logits, targets, full, 2.0, 1.0).abs() < 1e-5
    # The teacher summarized by its top 3 tokens and the rest bucket is matched by itself too.
    assert distill_loss(logits, targets, summarize_teacher(logits, 2.0, 3), 2.0, 1.0).abs() < 1e-5


def test_top_k_targets_keep_a_rest_bucket_so_the_student_is_scored_over_the_same_outcomes():
    torch.manual_seed(1)
    teacher, student, targets = torch.randn(4, 6, 50), torch.randn(4, 6, 50), torch.randint(0, 50, (4, 6))
    full = distill_loss(student, targets, summarize_teacher(teacher, 2.0, 0), 2.0, 1.0)
    for k in (1, 5, 20, 49):
        kl_k = distill_loss(student, targets, summarize_teacher(teacher, 2.0, k), 2.0, 1.0)
        # Merging outcomes never adds divergence (KL's data-processing inequality): 0 <= KL_k <= KL.
        assert 0 <= kl_k <= full + 1e-5
    t = summarize_teacher(teacher, 2.0, 5)
    assert t.index.shape == (4, 6, 5) and t.lse.shape == (4, 6)
    assert summarize_teacher(teacher, 2.0, 50).index is None  # k >= vocabulary: the full distribution


def test_student_blocks_imitate_evenly_spaced_teacher_blocks_last_to_last():
    assert matched_layers(2, 4) == [1, 3]
    assert matched_layers(4, 4) == [0, 1, 2, 3]
    assert matched_layers(3, 12) == [3, 7, 11]
    assert matched_layers(1, 6) == [5]


@pytest.mark.slow
def test_distilled_student_improves_and_loss_falls(trained_run, tiny_data, tmp_path):
    teacher = lmforge.load(trained_run.model_dir)
    cfg = DistillConfig(steps=30, batch_size=8, lr=1e-2, top_k=16, pool=10)
    out = tmp_path / "student"
    r = run_distill(trained_run.model_dir, str(_half_depth_recipe(teacher, tmp_path)), tiny_data, out, cfg,
                    log=lambda s: None)
    losses = r["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert r["val_perplexity_after"] < r["val_perplexity_before"]
    student = lmforge.load(out)
    assert student.config.n_layer <= teacher.config.n_layer
    assert student.meta["distillation"]["teacher"] == str(trained_run.model_dir)


def _half_depth_recipe(teacher, tmp_path):
    import yaml

    c = teacher.config
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": c.family, "n_layer": max(1, c.n_layer // 2), "n_head": c.n_head,
                                              "n_kv_head": c.n_kv_head, "d_model": c.d_model // 2, "context": c.context}}))
    return path


def test_mismatched_vocabularies_are_refused(make_model, tiny_data):
    with pytest.raises(LmforgeError, match="vocabularies differ"):
        distill(make_model(vocab_size=320), make_model(vocab_size=300), tiny_data, DistillConfig(steps=1))


def test_bad_settings_are_clear_errors(cli, tmp_path):
    """The settings are a config Section (unknown keys refused); `lmforge distill` names the flag."""
    from pydantic import ValidationError

    for bad, message in (({"temperature": 0}, "temperature\n  Value error, must be positive"),
                         ({"alpha": 1.5}, "alpha\n  Value error, must be in [0, 1]"),
                         ({"steps": 0}, "steps\n  Value error, must be positive"),
                         ({"top_k": -1}, "top_k\n  Value error, must be >= 0"),
                         ({"hidden_weight": -1}, "hidden_weight\n  Value error, must be >= 0"),
                         ({"temprature": 2.0}, "temprature\n  Extra inputs are not permitted")):
        with pytest.raises(ValidationError) as info:
            DistillConfig(**bad)
        assert message in str(info.value)
    run = cli("distill", "--teacher", tmp_path, "--student", tmp_path, "--data", tmp_path, "--out", tmp_path / "s",
              "--top-k", "-1", "--alpha", "2")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--alpha must be in [0, 1]; --top-k must be >= 0" in " ".join(run.stderr.split())
    assert not (tmp_path / "s").exists() and not (tmp_path / "s-run").exists()


def test_distillation_runs_on_the_training_loop(make_model, tiny_data, tmp_path):
    """The shared loop's schedule, metrics log and checkpoint: every step's loss is recorded,
    the learning rate follows train.optim's cosine, the width maps train with the student."""
    from lmforge.compress.distill import train_config
    from lmforge.train.metrics import read_metrics
    from lmforge.train.optim import lr_at

    teacher = make_model(vocab_size=512, n_layer=4, d_model=64)
    student = make_model(vocab_size=512, seed=1, n_layer=2, d_model=32)
    cfg = DistillConfig(steps=6, batch_size=4, lr=1e-2, hidden_weight=1.0)
    result = distill(teacher, student, tiny_data, cfg, run_dir=tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == result.losses
    tc = train_config(cfg, torch.device("cpu"))
    assert [r["lr"] for r in records] == [lr_at(step, tc) for step in range(6)]
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert {k for k in saved if k.startswith("model.1.")} == {f"model.1.{j}.weight" for j in range(2)}  # the maps
    assert result.val_after < result.val_before and not student.training


def test_an_interrupted_distillation_resumes_from_its_run_directory(make_model, tiny_data, tmp_path):
    """Stopped after 3 of 6 steps (as Ctrl-C stops it: a checkpoint, then TrainingInterrupted) and
    resumed with --resume: the losses and the student equal those of an uninterrupted run."""
    from lmforge.errors import TrainingInterrupted
    from lmforge.train.metrics import read_metrics

    def run(name: str, **options):
        teacher = make_model(vocab_size=512, n_layer=4, d_model=64)
        student = make_model(vocab_size=512, seed=1, n_layer=2, d_model=32)  # as built: the run replaces its weights
        cfg = DistillConfig(steps=6, batch_size=4, lr=1e-2, hidden_weight=1.0, top_k=8)
        return distill(teacher, student, tiny_data, cfg, run_dir=tmp_path / name, **options), student

    whole, whole_student = run("whole")
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; .* continue with --resume"):
        run("resumed", interrupt_at=3)
    assert (tmp_path / "resumed" / "latest").resolve().name == "step-000003"
    with pytest.raises(LmforgeError, match="already has checkpoints: pass --resume to continue it, or choose "
                                           "another --run-dir"):
        run("resumed")
    resumed, resumed_student = run("resumed", resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert resumed.losses == whole.losses
    assert resumed.val_before == whole.val_before and resumed.val_after == whole.val_after
    whole_state, resumed_state = whole_student.state_dict(), resumed_student.state_dict()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)


@pytest.mark.slow
def test_distill_command_keeps_its_run_beside_the_output_and_resumes(trained_run, tiny_data, tmp_path, cli):
    teacher = lmforge.load(trained_run.model_dir)
    flags = ["distill", "--teacher", trained_run.model_dir, "--student", _half_depth_recipe(teacher, tmp_path),
             "--data", tiny_data, "--out", tmp_path / "student", "--steps", "4", "--batch-size", "4"]
    first = cli(*flags)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "student-run"
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "latest").resolve().name == "step-000004"
    assert "steps: 4" in (run_dir / "recipe.yaml").read_text()
    again = cli(*flags)
    assert again.returncode == 2 and "pass --resume to continue it, or choose another --run-dir" in again.stderr
    resumed = cli(*flags, "--resume")  # a finished run: nothing left to train, the student is written again
    assert resumed.returncode == 0, resumed.stderr
    assert lmforge.load(tmp_path / "student").meta["distillation"]["steps"] == 4
