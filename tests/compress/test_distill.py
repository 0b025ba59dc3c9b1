"""Distillation: the loss, its falling, the student improving, top-k caching, bad input."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.compress.distill import DistillConfig, distill, distill_loss, run_distill
from lmforge.errors import LmforgeError


def test_distill_loss_is_cross_entropy_at_alpha_zero_and_zero_kl_for_the_teacher_itself():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(distill_loss(logits, targets, (logits, None), 2.0, 0.0), ce)
    assert distill_loss(logits, targets, (logits, None), 2.0, 1.0).abs() < 1e-5
    values, index = logits.topk(11, dim=-1)  # top-k with k = vocab is the full distribution
    assert torch.allclose(distill_loss(logits, targets, (values, index), 2.0, 1.0), torch.tensor(0.0), atol=1e-5)


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


def test_bad_settings_are_clear_errors():
    for bad in ({"temperature": 0}, {"alpha": 1.5}, {"steps": 0}, {"top_k": -1}):
        with pytest.raises(LmforgeError):
            DistillConfig(**bad)
