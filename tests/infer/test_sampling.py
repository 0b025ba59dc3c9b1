"""Choosing the next token: greedy, top-k, top-p, temperature, repetition penalty, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample, scale


def logits_from(probs: list[float], order: list[int] | None = None) -> torch.Tensor:
    """(1, V) logits whose softmax is `probs`, optionally placed at token ids `order`."""
    values = torch.tensor([math.log(p) for p in probs])
    if order is not None:
        values = torch.empty_like(values).index_copy_(0, torch.tensor(order), values)
    return values[None]


def kept(filtered: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filtered[0])).flatten().tolist())


def test_greedy_is_argmax():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0), None), logits.argmax(-1))


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 5.0):
        picked = sample(logits, SamplingParams(temperature=temperature, top_k=1), gen)
        assert torch.equal(picked, logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = logits_from([0.4, 0.3, 0.2, 0.1], order=[3, 0, 2, 1])
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == {3, 0}
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize(("top_p", "expected"), [(0.3, {0}), (0.5001, {0, 1}), (0.7, {0, 1}),
                                                  (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # token ids of the four, not sorted
    filtered = filter_logits(logits_from(probs, order), top_k=0, top_p=top_p)
    assert kept(filtered) == {order[i] for i in expected}


def test_top_p_filters_each_row_on_its_own():
    logits = torch.cat([logits_from([0.9, 0.05, 0.05]), logits_from([0.4, 0.35, 0.25])])
    filtered = filter_logits(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(filtered).sum(-1).tolist() == [1, 2]


def test_sampling_respects_the_filters():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2)).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    picked = set(sample(logits, SamplingParams(temperature=1.5, top_k=3), gen).tolist())
    assert picked <= set(logits[0].topk(3).indices.tolist()) and len(picked) > 1


def test_same_seed_same_sample():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    draws = [sample(logits, params, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_low_temperature_approaches_greedy():
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(4))
    picked = sample(logits, SamplingParams(temperature=1e-4), torch.Generator().manual_seed(0))
    assert torch.equal(picked, logits.argmax(-1))


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=-1), dict(repetition_penalty=0.0),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(repetition_penalty=float("inf"))])
def test_invalid_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-44, 5e-324])
def test_temperatures_too_small_for_float32_are_greedy(temperature):
    """logits / 1e-44 overflows to inf (and 5e-324 is 0 in float32): softmax would be nan."""
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(5)) * 30
    for top_k, top_p in [(0, 1.0), (50, 0.9)]:
        picked = sample(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                        torch.Generator().manual_seed(0))
        assert torch.equal(picked, logits.argmax(-1))


def test_scaled_logits_never_overflow():
    logits = torch.tensor([[3e38, -3e38, 0.0, float("nan")],
                           [float("inf"), 1.0, float("inf"), float("-inf")],
                           [float("nan"), float("-inf"), float("nan"), float("-inf")]])
    for temperature in (1e-38, 1e-3, 2.0):
        scaled = scale(logits, temperature)
        assert not scaled.isnan().any() and (scaled <= 0).all()
        probs = scaled.softmax(-1)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    probs = scale(logits, 1.0).softmax(-1)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # nan counts as -inf
    assert probs[1].tolist() == [0.5, 0.0, 0.5, 0.0]  # +inf logits share the probability
    assert probs[2].tolist() == [0.25] * 4  # nothing finite: every token alike, never a nan


def test_extreme_penalties_and_top_p_sample_a_real_token():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(6)) * 10
    seen = torch.zeros(4, 300, dtype=torch.bool)
    seen[:, ::3] = True
    gen = torch.Generator().manual_seed(0)
    for penalty in (1e-300, 1e-40, 10.0):
        penalized = apply_repetition_penalty(logits, seen, penalty)
        assert torch.isfinite(penalized).all()
        picked = sample(penalized, SamplingParams(temperature=1.0, repetition_penalty=penalty), gen)
        assert ((0 <= picked) & (picked < 300)).all()
    # top_p below float32's smallest keeps the best token alone
    picked = sample(logits, SamplingParams(temperature=2.0, top_p=1e-300), gen)
    assert torch.equal(picked, logits.argmax(-1))
