"""Prefill a prompt into a KV cache a chunk of tokens at a time.

A whole prompt in one forward holds every layer's activations for all T tokens at once, and
where attention needs a mask (left padding, a sliding window, a cached prefix) a (T, T) score
matrix per head. Fed in chunks of C tokens, each chunk attends to the cache so far (a (C, S)
mask and scores), so the transient memory grows with C times the prompt, not its square, and
the result is the same forward: every token still sees exactly the tokens before it.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

# Chosen with benchmarks/long_prompt.py --chunks: past a few hundred tokens a chunk's matmuls
# run about as fast as the whole prompt's, while the memory keeps growing with the chunk.
DEFAULT_PREFILL_CHUNK = 512


def check_chunk(chunk: int | None) -> int | None:
    """The chunk size, or a user error for one below 1 (None or 0: the prompt in one forward)."""
    if chunk is None or chunk == 0:
        return None
    if chunk < 1:
        raise LmforgeError(f"--prefill-chunk must be a positive number of tokens (or 0 for none), not {chunk}")
    return chunk


def chunk_bounds(T: int, chunk: int | None) -> list[tuple[int, int]]:
    """(start, end) of each chunk of a T-token prompt; one piece when `chunk` is None."""
    step = T if not chunk else chunk
    return [(s, min(s + step, T)) for s in range(0, T, step)] or [(0, 0)]


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: torch.Tensor, cache, pad_mask: torch.Tensor | None = None,
            chunk: int | None = DEFAULT_PREFILL_CHUNK, all_logits: bool = False,
            bind=None) -> torch.Tensor:
    """Run `ids` (B, T) through `model` into `cache`, `chunk` tokens per forward; the logits of
    the last position (B, 1, V), or of every position (B, T, V) with `all_logits`.

    `bind(start, t)`, if given, is called before each chunk (a SlotCache's `bind_prefill`)."""
    outs = []
    for start, end in chunk_bounds(ids.shape[1], check_chunk(chunk)):
        if bind is not None:
            bind(start, end - start)
        part_mask = None if pad_mask is None else pad_mask[:, start:end]
        logits = model(ids[:, start:end], cache, pad_mask=part_mask, last_only=not all_logits)
        if all_logits:
            outs.append(logits)
    return torch.cat(outs, dim=1) if all_logits else logits
