"""What a model does with one prompt: attention weights, logit lens, token attributions.

Nothing here changes the model. Attention uses `F.scaled_dot_product_attention`, which
returns no weights, so a forward pre-hook captures each block's attention input and the
weights are recomputed from that block's own q/k projection and rotary tables. The logit
lens reads each block's output (the residual stream) through the final norm and the LM
head. Attributions replace the token embeddings (a forward hook on `tok_emb`) and take
gradients of one output score with respect to them.

Integrated gradients start from a baseline prompt made of one token (e.g. end-of-text) at every
position, not from all-zero embeddings: every family but gpt2 normalizes the embeddings before
anything else (RMSNorm, which is scale-invariant) and has no position embedding added to them,
so along a path from zero the score is flat except for a jump in a sliver next to zero that no
quadrature samples, and the attributions then miss most of the score difference. Positions
(learned or rotary) are not interpolated: they are the same along the whole path.

The score being explained is `head(hidden_states)` at the last position: by default the
LM head's logit of the predicted next token; pass a classification head (any callable
from the final hidden states (B, T, d) to label logits (B, n_labels)) to explain the
predicted label instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.model.transformer import rotate_half

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states (B, T, d) -> scores (B, n_out)


def _check_attention(model: Transformer) -> None:
    blocks = getattr(model, "blocks", None)
    if not blocks or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise LmforgeError(f"{type(model).__name__} has no attention layers lmforge can read weights from "
                           "(blocks[i].attn.qkv); explain needs an lmforge Transformer")


@torch.no_grad()
def attention_maps(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Attention weights (n_layer, n_head, T, T) for one sequence `ids` (T,)."""
    _check_attention(model)
    inputs: dict[int, tuple] = {}
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args))
             for i, b in enumerate(model.blocks)]
    try:
        model(ids[None])
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for i, block in enumerate(model.blocks):
        x, rope, _cache, _layer, mask, _causal = inputs[i]
        attn = block.attn
        T = x.shape[1]
        q, k, _ = attn.qkv(x).split([attn.n_head * attn.d, attn.n_kv * attn.d, attn.n_kv * attn.d], dim=-1)
        q = q.view(1, T, attn.n_head, attn.d).transpose(1, 2)  # (1, h, T, d)
        k = k.view(1, T, attn.n_kv, attn.d).transpose(1, 2)  # (1, kv, T, d)
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(attn.n_head // attn.n_kv, dim=1)  # grouped-query: each kv head serves a group
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(attn.d)  # (1, h, T, T)
        allowed = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        maps.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1)[0])
    return torch.stack(maps)


@dataclass
class LensRow:
    layer: str
    top: list[list[tuple[int, float]]]  # per position: (token id, probability) best first


@torch.no_grad()
def logit_lens(model: Transformer, ids: torch.Tensor, k: int = 5) -> list[LensRow]:
    """Top-k next-token predictions at every position, read after the embeddings and after each block."""
    streams: list[torch.Tensor] = []
    hooks = [model.drop.register_forward_hook(lambda mod, inp, out: streams.append(out))]
    hooks += [b.register_forward_hook(lambda mod, inp, out: streams.append(out)) for b in model.blocks]
    try:
        model(ids[None])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n, x in enumerate(streams):
        probs = model.lm_head(model.norm_f(x))[0].float().softmax(-1)  # (T, V)
        p, t = probs.topk(k, dim=-1)
        rows.append(LensRow("embeddings" if n == 0 else f"block {n - 1}",
                            [list(zip(t[i].tolist(), p[i].tolist())) for i in range(len(ids))]))
    return rows


def lm_head_scores(model: Transformer) -> Head:
    return lambda h: model.lm_head(h[:, -1])


def _scores_from_embeddings(model: Transformer, ids: torch.Tensor, emb: torch.Tensor, head: Head) -> torch.Tensor:
    """head(hidden states) with the token embeddings replaced by `emb` (B, T, d): (B, n_out)."""
    hook = model.tok_emb.register_forward_hook(lambda mod, inp, out: emb)
    try:
        return head(model.hidden_states(ids[None].expand(emb.shape[0], -1))).float()
    finally:
        hook.remove()


@dataclass
class Attribution:
    target: int  # the explained output: a token id, or a label index for a classification head
    gradient_x_input: np.ndarray  # (T,)
    integrated_gradients: np.ndarray  # (T,)
    score: float  # the target's score at the input
    baseline_score: float  # ... and at the baseline prompt (`baseline_token` at every position)
    baseline_token: int
    steps: int  # the quadrature points the integrated gradients took

    @property
    def completeness_gap(self) -> float:
        """|sum(IG) - (score - baseline score)|: zero for exact integration."""
        return abs(float(self.integrated_gradients.sum()) - (self.score - self.baseline_score))


def _integrated_gradients(model: Transformer, ids: torch.Tensor, emb: torch.Tensor, base: torch.Tensor,
                          head: Head, target: int, steps: int, chunk: int) -> torch.Tensor:
    """Gauss-Legendre quadrature over `steps` points of the straight path base -> emb: (T,)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = (nodes + 1) / 2, weights / 2  # [-1, 1] -> [0, 1]
    total = torch.zeros_like(emb)
    for s in range(0, steps, chunk):
        a = torch.tensor(alphas[s:s + chunk], dtype=emb.dtype, device=emb.device)[:, None, None]
        w = torch.tensor(weights[s:s + chunk], dtype=emb.dtype, device=emb.device)[:, None, None]
        path = (base + a * (emb - base)).requires_grad_(True)
        out = _scores_from_embeddings(model, ids, path, head)[:, target]
        (g,) = torch.autograd.grad(out.sum(), path)
        total += (w * g).sum(0, keepdim=True)
    return (total * (emb - base))[0].sum(-1)


def attributions(model: Transformer, ids: torch.Tensor, head: Head | None = None, target: int | None = None,
                 steps: int = 32, chunk: int = 16, *, baseline: int, tolerance: float = 1e-3,
                 max_steps: int | None = None) -> Attribution:
    """Gradient x input and integrated gradients of one output score, per input token.

    Integrated gradients run from the `baseline` token's embedding at every position to the
    prompt's embeddings. Their sum should equal the score minus the baseline's score; while it
    misses by more than `tolerance` of that difference (a sharp model needs more points), the
    quadrature doubles its points, up to `max_steps` (default 8 x `steps`)."""
    head = head or lm_head_scores(model)
    vocab = model.tok_emb.weight.shape[0]
    if not 0 <= baseline < vocab:
        raise LmforgeError(f"the baseline token {baseline} is outside the vocabulary [0, {vocab})")
    was_training = model.training
    model.eval()
    emb = model.tok_emb(ids[None]).detach()  # (1, T, d)
    base = model.tok_emb(torch.full_like(ids, baseline)[None]).detach()
    x = emb.clone().requires_grad_(True)
    scores = _scores_from_embeddings(model, ids, x, head)[0]
    if target is None:
        target = int(scores.argmax())
    (grad,) = torch.autograd.grad(scores[target], x)
    gxi = (grad * emb)[0].sum(-1)
    with torch.no_grad():
        base_score = float(_scores_from_embeddings(model, ids, base, head)[0, target])
    score = float(scores[target].detach())
    # Float32 sums of T terms are not exact: below ~1e-2 of difference, judge the gap absolutely.
    allowed = tolerance * max(abs(score - base_score), 1e-2)
    max_steps = max_steps or 8 * steps
    while True:
        ig = _integrated_gradients(model, ids, emb, base, head, target, steps, chunk)
        if abs(float(ig.sum()) - (score - base_score)) <= allowed or steps * 2 > max_steps:
            break
        steps *= 2
    model.train(was_training)
    return Attribution(target, gxi.detach().cpu().numpy(), ig.detach().cpu().numpy(), score, base_score,
                       baseline, steps)


def next_token_distribution(model: Transformer, ids: torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
    with torch.no_grad():
        p, t = F.softmax(model(ids[None], last_only=True)[0, -1].float(), -1).topk(k)
    return list(zip(t.tolist(), p.tolist()))
