"""Log-likelihood of continuations given contexts, batched, each context computed once.

Multiple-choice scoring asks for log P(choice | context) for every choice of an example:
k requests sharing one context. Scoring each (context + choice) as its own sequence, as
most harnesses do, recomputes the context k times. Here requests are grouped by context;
a batch of distinct contexts is run once through the KV cache (left-padded), the cache
rows are repeated once per continuation, and only the continuation tokens are fed:

    contexts (B, Lc) -> cache ; cache rows repeated -> (R, Lc) ; continuations (R, Lt)

The first continuation token is scored from the context's last logits, the rest from the
continuation step's own logits, so the result equals scoring each full sequence alone.

Contexts also share prefixes across examples: few-shot examples, a task's instructions.
With `prefix_cache` on, contexts are sorted so that those starting alike are neighbours;
a batch whose contexts share at least `MIN_SHARED` leading tokens computes that prefix once
(one row, whose keys and values also go to an `infer.prefix_cache.PrefixCache`, so the next
batch with the same prefix copies them instead of computing them), repeats it to every row,
and feeds only each context's rest, left-padded after the prefix (positions count valid
tokens, so padding between prefix and rest changes nothing). A prefix computed apart runs
matmuls of another shape than the whole context's, so scores equal the cache-off ones to
float32 rounding (1e-5 or so), not bitwise. Models with a sliding window are scored without
the sharing: their window is counted in cache slots, which the padding would stretch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.model import KVCache, Transformer

MIN_SHARED = BLOCK  # leading tokens a batch's contexts must share for the prefix to be computed once
PREFIX_CACHE_BYTES = 128 << 20  # the prefixes kept across batches of one call


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
                   max_logits: int = 1 << 26, prefix_cache: bool = True) -> list[Score]:
    """Score every (context, continuation) request; results in request order.

    `batch_size` distinct contexts run together, fewer when their continuations' logits
    (rows x longest continuation x vocabulary) would pass `max_logits` floats (256 MB).
    With `truncate`, over-long contexts lose their oldest tokens (what lm-eval's backends
    do); otherwise they are an error naming the request (`names(i)`). `prefix_cache`: compute
    prefixes that contexts share once (see the module's docstring).
    """
    limit = model.config.context
    name = names or (lambda i: f"request {i}")
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        ctx = fit_context(ctx, cont, limit, truncate, name(i))
        groups.setdefault(tuple(ctx), []).append((i, list(cont)))
    results: list[Score | None] = [None] * len(requests)
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    fits = _logit_budget(groups, batch_size, max_logits, model.config.vocab)
    unshared = list(groups)
    if prefix_cache and not _has_window(model):
        cache = PrefixCache(PREFIX_CACHE_BYTES)
        unshared = []
        for batch, shared in _prefix_batches(sorted(groups), fits):
            # Worth it when the prefix once plus the padded rests is less than the contexts alone.
            if shared >= MIN_SHARED and shared + len(batch) * (max(map(len, batch)) - shared) < sum(map(len, batch)):
                _score_batch(model, batch, groups, results, pad_id, device, (shared, cache))
            else:
                unshared += batch
    # Longest contexts first: similar lengths share a batch, so little padding. (Ties keep
    # the requests' order, so batches are those of the cache-off run when nothing is shared.)
    kept = set(unshared)
    order = sorted((c for c in groups if c in kept), key=len, reverse=True)
    start = 0
    while start < len(order):
        batch = [order[start]]
        start += 1
        while start < len(order) and fits(batch, order[start]):
            batch.append(order[start])
            start += 1
        _score_batch(model, batch, groups, results, pad_id, device)
    model.train(was_training)
    return results  # type: ignore[return-value]


def _logit_budget(groups, batch_size: int, max_logits: int, vocab: int):
    """fits(batch, context): whether `context` may join `batch` within `batch_size` contexts and
    `max_logits` continuation logits (rows x longest continuation x vocabulary)."""
    def fits(batch: list[tuple[int, ...]], context: tuple[int, ...]) -> bool:
        if len(batch) >= batch_size:
            return False
        conts = [c for ctx in (*batch, context) for _, c in groups[ctx]]
        return len(conts) * max(map(len, conts)) * vocab <= max_logits
    return fits


def _has_window(model: Transformer) -> bool:
    return any(model.config.layer_window(i) is not None for i in range(model.config.n_layer))


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefix_batches(order: list[tuple[int, ...]], fits):
    """Batches of consecutive (sorted) contexts, each with the number of leading tokens all its
    contexts share, at most the shortest's length - 1 (every context keeps a token of its own
    to feed). A context joins the batch while the shared part stays >= MIN_SHARED."""
    start = 0
    while start < len(order):
        batch = [order[start]]
        shared = len(order[start]) - 1
        start += 1
        while start < len(order) and fits(batch, order[start]):
            nxt = order[start]
            n = min(shared, _common_length(batch[0], nxt), len(nxt) - 1)
            if n < MIN_SHARED:
                break
            batch.append(nxt)
            shared = n
            start += 1
        yield batch, (shared if len(batch) > 1 else 0)


def _prefill_prefix(model: Transformer, prefix: list[int], rows: int, capacity: int, cache: PrefixCache,
                    device) -> KVCache:
    """A cache of `rows` rows each holding `prefix`'s keys and values: what `cache` has of them
    copied, the rest computed once."""
    one = model.new_cache(1, capacity=capacity)
    hit = cache.lookup("score", prefix, one.k, one.v, 0)
    if hit:
        one.valid[:, :hit] = True
        one.length = hit
    model(torch.tensor([prefix[hit:]], device=device), one, last_only=True)
    cache.store("score", prefix, one.k, one.v, 0)
    return _repeat_rows(one, torch.zeros(rows, dtype=torch.long, device=device))


def _score_batch(model, contexts, groups, results, pad_id, device, prefix=None) -> None:
    """Score the continuations of `contexts`; `prefix` = (n, PrefixCache): the contexts' first n
    tokens are shared, computed once (or copied from the cache)."""
    shared = prefix[0] if prefix else 0
    ctx_ids, ctx_mask = _pad([list(c[shared:]) for c in contexts], pad_id, left=True)
    conts = [(b, i, cont) for b, c in enumerate(contexts) for i, cont in groups[c]]
    longest_cont = max(len(c) for _, _, c in conts)
    capacity = shared + ctx_ids.shape[1] + longest_cont - 1
    if prefix:
        cache = _prefill_prefix(model, list(contexts[0][:shared]), len(contexts), capacity, prefix[1], device)
    else:
        cache = model.new_cache(len(contexts), capacity=capacity)
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
