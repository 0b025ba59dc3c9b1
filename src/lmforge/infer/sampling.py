"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Safe for every parameter value `SamplingParams` accepts: no temperature, penalty or top-p,
however extreme, makes a logit overflow or a probability nan, so sampling never raises on
numbers (a server samples many requests in one batch; one request's parameters must not
be able to break the step).
"""

from __future__ import annotations

import math

import torch
from pydantic import ConfigDict, field_validator

from lmforge.config import Section

# Below the smallest normal float32, a temperature is 0 in float32 arithmetic; long before
# that, all the probability is on the best token anyway.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


class SamplingParams(Section):
    """How one request picks its tokens. Frozen: a request's parameters stay what was checked
    while the engine samples it step after step."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (CTRL-style: divides positive logits, multiplies negative)
    stop: list[str] = []
    seed: int | None = None

    @field_validator("max_new_tokens", "top_k")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("temperature")
    @classmethod
    def _finite_not_negative(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a finite number >= 0 (0: greedy)")
        return value

    @field_validator("top_p")
    @classmethod
    def _probability_mass(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("must be in (0, 1] (1: off)")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _finite_positive(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError("must be a finite number > 0 (1: off)")
        return value


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool of tokens already in the prompt or output. In float32,
    kept finite: a penalty near 0 would otherwise turn positive logits into inf."""
    logits = logits.float()
    big = torch.finfo(torch.float32).max
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-big, big)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False  # a top_p below float32's smallest is 0 there, which would drop it
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - best) / temperature, in float32, with every value in [-inf, 0] and each row's
    best exactly 0: no temperature >= GREEDY_BELOW overflows, and softmax always has a token
    to give probability to. A nan logit counts as -inf; a row with +inf logits shares its
    probability among those; a row with nothing better than -inf, among all its tokens."""
    logits = logits.float()
    logits = torch.where(logits.isnan(), float("-inf"), logits)
    best = logits.amax(dim=-1, keepdim=True)
    shifted = torch.where(logits == best, 0.0, logits - best)
    return shifted / temperature


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = filter_logits(scale(logits, params.temperature), params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
