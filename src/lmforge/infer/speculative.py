"""Speculative decoding: guess several next tokens cheaply, check them all in one forward pass.

A drafter proposes up to k tokens after a sequence's context: `NgramDrafter` copies what
followed the last occurrence of the context's final n-gram (prompt lookup: outputs that
repeat their prompt, as edits, extraction and code do), `DraftModelDrafter` lets a small
model of the same tokenizer decode them. The engine feeds the last sampled token and the
drafts to the model in one step (each row attends to the ones before it) and keeps the
drafts the model agrees with, plus one token of its own: k + 1 tokens for one pass over
the weights at best, one at worst.

Agreement keeps the model's outputs exactly: greedy, a draft is kept when it is the
model's argmax. Sampling, `verify` is the standard rejection rule (Leviathan et al. 2023,
Chen et al. 2023): draft d drawn from q is kept with probability min(1, p(d)/q(d)), and
at the first rejection the model's token is drawn from max(p - q, 0), renormalized; so
every emitted token has the model's distribution p. A prompt-lookup draft is a point mass
(q(d) = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import GREEDY_BELOW, SamplingParams, filter_logits, scale
from lmforge.model import Transformer


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sampling.sample` draws from at temperature > 0: (B, V) -> (B, V)."""
    return filter_logits(scale(logits, params.temperature), params.top_k, params.top_p).softmax(dim=-1)


def verify(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
           generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """Rejection sampling of drafts against the model's distributions p (m, V), p[j] the one
    drafts[j] was drawn for; q (m, V) the drafter's, None for point masses. Returns how many
    drafts are kept and, after a rejection, the distribution to draw the model's token from
    (None when all are kept: the next token is then drawn from the model's next distribution)."""
    for j, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[j, d])
        u = float(torch.rand((), generator=generator))
        if q_d > 0 and u * q_d < float(p[j, d]):  # u < p(d) / q(d)
            continue
        residual = p[j].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[j]).clamp_(min=0.0)
        total = float(residual.sum())
        # p <= q everywhere only when p == q (up to rounding): then rejection is a rounding artefact
        return j, (residual / total if total > 0 else p[j].clone())
    return len(drafts), None


class Drafter(Protocol):
    def propose(self, seq_id: int, context: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens after `context`, and their (k, V) distributions (None: point masses)."""
        ...

    def kept(self, seq_id: int, n: int) -> None:
        """The sequence's first n tokens (context and kept drafts) are final."""
        ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's
    last n tokens, for the longest n in [min_n, max_n] that occurs."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise LmforgeError("n-gram sizes must satisfy 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seq_id, context, k, params, generator):
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k], None
        return [], None

    def kept(self, seq_id, n):
        pass


class DraftModelDrafter:
    """A small model of the same tokenizer decodes the drafts; it keeps the keys and values of
    one sequence (speculation runs at batch 1) and catches up on what the model kept."""

    def __init__(self, model: Transformer, target_vocab: int, context: int):
        from lmforge.infer.native_decode import NativeDecoder

        if model.config.vocab != target_vocab:
            raise LmforgeError(f"the draft model's vocabulary has {model.config.vocab} tokens and the model's "
                               f"{target_vocab}: --draft needs a model with the same tokenizer")
        self.model = model.eval()
        self.cache = model.new_cache(1, min(context, model.config.context))
        self.native = NativeDecoder.create(model, self.cache.k, self.cache.v)
        self.seq_id: int | None = None

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens after what the draft cache holds; the next token's logits (1, V)."""
        start = self.cache.length
        if self.native is not None and len(tokens) == 1:
            logits = self.native.step(tokens, [start])
            self.cache.advance(1)
            return logits
        ids = torch.tensor([tokens], dtype=torch.long, device=self.cache.k[0].device)
        return self.model(ids, self.cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def propose(self, seq_id, context, k, params, generator):
        if seq_id != self.seq_id:
            self.seq_id, self.cache.length = seq_id, 0
        k = min(k, self.cache.capacity - len(context))
        if k <= 0 or len(context) > self.cache.capacity:
            return [], None
        logits = self._feed(context[self.cache.length:])
        drafts, qs = [], []
        greedy = params.temperature < GREEDY_BELOW
        for j in range(k):
            if greedy:
                token = int(logits.argmax(dim=-1))
            else:
                q = target_probs(logits, params)
                token = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q[0])
            drafts.append(token)
            if j < k - 1:
                logits = self._feed([token])
        return drafts, (None if greedy else torch.stack(qs))

    def kept(self, seq_id, n):
        if seq_id == self.seq_id:
            self.cache.length = min(self.cache.length, n)


@dataclass
class SpeculationStats:
    steps: int = 0  # verification passes
    proposed: int = 0  # draft tokens checked
    accepted: int = 0  # of those, kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Speculator:
    """What the engine needs: a drafter, how many tokens to draft, and counts."""

    def __init__(self, drafter: Drafter, k: int = 5):
        if k < 1:
            raise LmforgeError("--speculative-tokens must be at least 1")
        self.drafter, self.k = drafter, k
        self.stats = SpeculationStats()

    @classmethod
    def ngram(cls, k: int = 5, max_n: int = 3) -> "Speculator":
        return cls(NgramDrafter(max_n), k)

    @classmethod
    def draft_model(cls, draft: Transformer, target: Transformer, k: int = 5) -> "Speculator":
        return cls(DraftModelDrafter(draft, target.config.vocab, target.config.context), k)
