"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay or constant."""

from __future__ import annotations

import pytest

from lmforge.config import TrainConfig
from lmforge.train.optim import build_optimizer, lr_at


def schedule(**kw) -> list[float]:
    cfg = TrainConfig(**{"lr": 1.0, "min_lr_ratio": 0.1, "warmup": 10, "max_steps": 110, **kw})
    return [lr_at(step, cfg) for step in range(cfg.max_steps + 1)]


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_linear_warmup_reaches_the_peak(name):
    lrs = schedule(schedule=name)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[9] == lrs[10] == pytest.approx(1.0)


def test_no_warmup_starts_at_the_peak():
    assert schedule(schedule="cosine", warmup=0)[0] == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_the_floor():
    lrs = schedule(schedule="cosine")
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[60] == pytest.approx((1.0 + 0.1) / 2)  # halfway down
    assert lrs[110] == pytest.approx(0.1)  # the end value is lr * min_lr_ratio
    assert lr_at(500, TrainConfig(lr=1.0, warmup=10, max_steps=110)) == pytest.approx(0.1)  # and stays there


def test_wsd_is_flat_then_decays_linearly_at_the_end():
    lrs = schedule(schedule="wsd", decay_fraction=0.2)  # decay over the last 22 of 110 steps
    assert lrs[10:88] == pytest.approx([1.0] * 78)
    assert lrs[99] == pytest.approx(1.0 + (0.1 - 1.0) * 11 / 22)
    assert lrs[110] == pytest.approx(0.1)
    tail = lrs[88:]
    assert all(a > b for a, b in zip(tail, tail[1:]))


def test_constant_stays_at_the_peak():
    assert schedule(schedule="constant")[10:] == pytest.approx([1.0] * 101)


def test_weight_decay_applies_to_matrices_only(make_model):
    import torch

    model = make_model("gpt2")
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # The tied embedding is one parameter, listed once.
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
