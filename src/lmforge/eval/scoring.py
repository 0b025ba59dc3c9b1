"""Log-likelihood of continuations given contexts, batched, each context computed once.

Multiple-choice scoring asks for log P(choice | context) for every choice of an example:
k requests sharing one context. Scoring each (context + choice) as its own sequence, as
most harnesses do, recomputes the context k times. Here requests are grouped by context;
a batch of distinct contexts is run once through the KV cache (left-padded), the cache
rows are repeated once per continuation, and only the continuation tokens are fed:

    contexts (B, Lc) -> cache ; cache rows repeated -> (R, Lc) ; continuations (R, Lt)

The first continuation token is scored from the context's last logits, the rest from the
continuation step's own logits, so the result equals scoring each full sequence alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import KVCache, Transformer


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log P(token | everything before it) over the continuation, nats
    greedy: bool  # every continuation token is the argmax at its position


Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def fit_context(context: Sequence[int], continuation: Sequence[int], limit: int, truncate: bool,
                what: str = "request") -> list[int]:
    """The context, left-truncated to fit `limit` tokens with its continuation if `truncate`,
    else an error naming the request."""
    if not continuation:
        raise LmforgeError(f"{what}: the continuation is empty (nothing to score)")
    if not context:
        raise LmforgeError(f"{what}: the context is empty; start it with the end-of-text token")
    total = len(context) + len(continuation)
    if total <= limit:
        return list(context)
    if not truncate or len(continuation) >= limit:
        raise LmforgeError(f"{what} is {total} tokens long (context {len(context)} + continuation "
                           f"{len(continuation)}), more than the model's context of {limit}; shorten it "
                           "or use fewer few-shot examples")
    return list(context[total - limit:])


def _repeat_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A cache whose row i is a copy of `cache`'s row `rows[i]` (same capacity and cursor)."""
    out = KVCache.__new__(KVCache)
    out.k = [t.index_select(0, rows) for t in cache.k]
    out.v = [t.index_select(0, rows) for t in cache.v]
    out.valid = cache.valid.index_select(0, rows)
    out.capacity, out.length, out.has_padding = cache.capacity, cache.length, cache.has_padding
    return out


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        s = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, s] = torch.tensor(r, dtype=torch.long)
        mask[i, s] = True
    return ids, mask


@torch.inference_mode()
def score_requests(model: Transformer, requests: Sequence[Request], batch_size: int = 16, pad_id: int = 0,
                   truncate: bool = False, names: Callable[[int], str] | None = None,
                   max_logits: int = 1 << 26) -> list[Score]:
    """Score every (context, continuation) request; results in request order.

    `batch_size` distinct contexts run together, fewer when their continuations' logits
    (rows x longest continuation x vocabulary) would pass `max_logits` floats (256 MB).
    With `truncate`, over-long contexts lose their oldest tokens (what lm-eval's backends
    do); otherwise they are an error naming the request (`names(i)`).
    """
    limit = model.config.context
    name = names or (lambda i: f"request {i}")
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        ctx = fit_context(ctx, cont, limit, truncate, name(i))
        groups.setdefault(tuple(ctx), []).append((i, list(cont)))
    # Longest contexts first: similar lengths share a batch, so little padding.
    order = sorted(groups, key=len, reverse=True)
    results: list[Score | None] = [None] * len(requests)
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    start = 0
    vocab = model.config.vocab
    while start < len(order):
        batch, rows, longest = [], 0, 0
        while start < len(order) and len(batch) < batch_size:
            conts = groups[order[start]]
            r, n = rows + len(conts), max(longest, *(len(c) for _, c in conts))
            if batch and r * n * vocab > max_logits:
                break
            batch.append(order[start])
            rows, longest = r, n
            start += 1
        _score_batch(model, batch, groups, results, pad_id, device)
    model.train(was_training)
    return results  # type: ignore[return-value]


def _score_batch(model, contexts, groups, results, pad_id, device) -> None:
    ctx_ids, ctx_mask = _pad([list(c) for c in contexts], pad_id, left=True)
    conts = [(b, i, cont) for b, c in enumerate(contexts) for i, cont in groups[c]]
    longest_cont = max(len(c) for _, _, c in conts)
    cache = model.new_cache(len(contexts), capacity=ctx_ids.shape[1] + longest_cont - 1)
    first = model(ctx_ids.to(device), cache, pad_mask=None if bool(ctx_mask.all()) else ctx_mask.to(device),
                  last_only=True)[:, -1].float().log_softmax(-1)  # (B, V)
    owner = torch.tensor([b for b, _, _ in conts], device=device)
    cont_ids, cont_mask = _pad([c for _, _, c in conts], pad_id, left=False)
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    logp = first.index_select(0, owner)[:, None]  # (R, 1, V): predicts continuation token 0
    greedy = logp.argmax(-1)
    if longest_cont > 1:
        # Feed all but the last continuation token; trailing padding is never attended to
        # by a real token (causal), so it needs no mask.
        rest = model(cont_ids[:, :-1], _repeat_rows(cache, owner)).float().log_softmax(-1)  # (R, Lt-1, V)
        logp = torch.cat([logp, rest], dim=1)
        greedy = logp.argmax(-1)
    token_logp = logp.gather(-1, cont_ids[..., None])[..., 0] * cont_mask  # (R, Lt)
    is_greedy = ((greedy == cont_ids) | ~cont_mask).all(-1)
    for r, (_, i, _) in enumerate(conts):
        results[i] = Score(float(token_logp[r].sum()), bool(is_greedy[r]))


@torch.inference_mode()
def rolling_logprob(model: Transformer, ids: Sequence[int], bos_id: int) -> float:
    """log P(ids) in nats, every token predicted: the first from `bos_id`, the rest in
    disjoint windows of the model's context (each window starts fresh, as in
    `evaluate_text`)."""
    tokens = [bos_id, *ids]
    window = model.config.context
    device = model.tok_emb.weight.device
    total = 0.0
    for s in range(0, len(tokens) - 1, window):
        chunk = torch.tensor(tokens[s:s + window + 1], device=device)
        logits = model(chunk[None, :-1])[0].float()
        total -= F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    return total
