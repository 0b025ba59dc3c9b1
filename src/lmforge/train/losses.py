"""The language-model loss, in one piece or in chunks of tokens (`train.loss_chunk`).

In one piece, the logits of every token, (B*T, vocab) in fp32, exist at once, with their
log-softmax and, in backward, their gradient: at vocabulary 50257 and 4 x 256 tokens that is
~200 MB per copy. Chunked, the final hidden states go through `lm_head` and cross-entropy
`chunk` rows at a time, and each chunk's gradients (with respect to the hidden states and to
`lm_head`'s weight) are computed right away, while its softmax is at hand: forward keeps one
chunk's logits at a time, backward only scales the gradients it was handed. No matmul is
repeated, so a chunked step does the arithmetic of an unchunked one; the gradients equal the
unchunked ones up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import native
from lmforge.data.sft import IGNORE
from lmforge.native import onednn


def _native_cross_entropy():
    return native.elementwise()


def _native_takes(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous()
            and _native_cross_entropy() is not None)


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                           grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (fp32) of `logits` (rows, vocab) against `targets` (rows,): a row
    whose target is `ignore_index` counts 0. With `grad`, `logits` is overwritten by the
    gradient of the summed loss with respect to it (softmax minus one-hot; zero for ignored
    rows). On the CPU one C pass per row does both, for fp32 or bf16 logits
    (lmforge/native/elementwise.c); elsewhere the logits must be fp32."""
    keep = targets != ignore_index
    if not bool(((targets >= 0) & (targets < logits.shape[1]) | ~keep).all()):
        raise ValueError(f"a target outside 0..{logits.shape[1] - 1} (and not the ignored {ignore_index})")
    if _native_takes(logits):
        loss = torch.empty(logits.shape[0], dtype=torch.float32)
        targets = targets.to(torch.int64).contiguous()
        _native_cross_entropy().cross_entropy_rows(
            logits.data_ptr(), int(logits.dtype == torch.bfloat16), logits.shape[0], logits.shape[1],
            targets.data_ptr(), ignore_index, int(grad), loss.data_ptr(), torch.get_num_threads())
        return loss
    y = targets.clamp(min=0)  # ignored rows: any class; their loss and gradient are zeroed below
    lse = logits.logsumexp(-1)
    loss = (lse - logits.gather(1, y[:, None])[:, 0]) * keep
    if grad:
        logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        logits[torch.arange(len(y), device=y.device), y] -= 1.0
        logits *= keep[:, None]
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, `chunk` rows at a time,
    with the gradients of that sum computed in the same pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, need_hidden: bool, need_weight: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            logits = onednn.matmul(h, weight)  # (c, vocab); under autocast the matmul is in its dtype
            if not (logits.dtype == torch.bfloat16 and _native_takes(logits)):
                logits = logits.float()  # the C kernel reads bf16 (autocast) as it is; the rest wants fp32
            want = grad_hidden is not None or grad_weight is not None
            total += softmax_cross_entropy_(logits, y, ignore_index, want).sum()
            if not want:
                continue
            grad_logits = logits  # now d(summed loss)/d(logits), (c, vocab)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = onednn.grad_input(grad_logits, weight.to(grad_logits.dtype))
            if grad_weight is not None:
                grad_weight += onednn.grad_weight(grad_logits, h.to(grad_logits.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          ignore_index: int = IGNORE, reduction: str = "mean") -> torch.Tensor:
    """Mean (or, with reduction "sum", summed) cross-entropy of the logits `hidden @ weight.T`
    ((N, d) @ (d, vocab)) against `targets` (N,), over the targets that are not `ignore_index`,
    as `F.cross_entropy` gives it, without ever holding more than `chunk` rows of logits."""
    grad = torch.is_grad_enabled()
    total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index,
                                             grad and hidden.requires_grad, grad and weight.requires_grad)
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


def _fuse_whole(head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    return (type(head) is nn.Linear and type(weight) is nn.Parameter and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and not torch.distributed.is_initialized()
            and _native_cross_entropy() is not None)


def language_model_loss(forward: Callable[..., torch.Tensor], head: nn.Linear, input_ids: torch.Tensor,
                        targets: torch.Tensor, chunk: int = 0, **forward_kwargs) -> torch.Tensor:
    """Next-token cross-entropy of a Transformer over the targets that are not IGNORE.

    `forward` is the model as the step calls it (possibly wrapped by DDP/FSDP, or compiled), so
    the wrapper sees the forward pass; `head` is the model's own `lm_head`. With `chunk` > 0
    the loss is `chunked_cross_entropy` over the final hidden states. With `chunk` 0 it is
    too where the native kernel applies (a plain fp32 `lm_head` on the CPU, one process), as
    one chunk: the same logits in one piece, their gradient taken in place, which beats
    PyTorch's log-softmax, scatter and log-softmax backward (benchmarks/RESULTS.md)."""
    if getattr(head, "soft_cap", None) is not None:
        chunk = 0  # gemma2/3 soft-cap the logits between lm_head and the loss: the model applies it
    elif not chunk and _fuse_whole(head):
        chunk = input_ids.numel()
    if chunk:
        hidden = forward(input_ids, return_hidden=True, **forward_kwargs)  # (B, T, C)
        return chunked_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(), chunk)
    logits = forward(input_ids, **forward_kwargs)  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
