"""One vector per sequence from a backbone's hidden states: the pooling that classification
heads and embeddings share.

    mean  the average over the sequence's tokens (an encoder's usual summary; the default for embeddings)
    last  its last token: on a causal backbone the only one that has seen all the others
    cls   its first token: an encoder's [CLS]; on a causal backbone it has seen only itself
"""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last", "cls")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, T, C) of right-padded rows, lengths (B,) of the real tokens -> (B, C)."""
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        keep = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * keep[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {how!r}")
