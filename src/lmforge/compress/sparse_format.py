"""The compact forms of pruned weight matrices, as tensors: 2:4 as half the values plus 2-bit
indices, very sparse layers as a bitmap plus the nonzero values (the layouts are described in
`lmforge.compress.sparse`, which stores them in a model directory). Below the decoder and the
model directory: the native decoder packs 2:4 layers with `pack_two_four`."""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

BITMAP_MIN_SPARSITY = 0.7
SPARSE_ATTR = "sparse_pattern"  # set to "2:4" on a loaded nn.Linear whose weight is 2:4


def is_two_four(weight: torch.Tensor) -> bool:
    N, K = weight.shape
    return K % 4 == 0 and bool(((weight.reshape(N, K // 4, 4) != 0).sum(-1) <= 2).all())


def check_two_four(weight: torch.Tensor, name: str = "the matrix") -> None:
    N, K = weight.shape
    if K % 4:
        raise LmforgeError(f"{name} has {K} inputs, not divisible by 4: the 2:4 pattern needs groups of 4")
    counts = (weight.reshape(N, K // 4, 4) != 0).sum(-1)
    if bool((counts > 2).any()):
        row, group = (counts > 2).nonzero()[0].tolist()
        raise LmforgeError(f"{name} is not 2:4 sparse: row {row}, inputs {4 * group}..{4 * group + 3} hold "
                           f"{int(counts[row, group])} nonzeros (at most 2 of every 4); prune it with --pattern 2:4")


def pack_two_four(weight: torch.Tensor, name: str = "the matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """(values (N, K/2) in weight's dtype, indices (N, ceil(K/8)) uint8) of a 2:4-valid (N, K) matrix."""
    check_two_four(weight, name)
    N, K = weight.shape
    groups = weight.reshape(N, K // 4, 4)
    # the nonzeros first (in input order), then the zeros: the first 2 positions are the kept ones
    order = torch.arange(4).expand_as(groups) + 4 * (groups == 0).to(torch.int64)
    pos = order.argsort(dim=-1, stable=True)[..., :2].sort(dim=-1).values  # (N, K/4, 2), increasing
    values = groups.gather(-1, pos).reshape(N, K // 2).contiguous()
    nibbles = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # (N, K/4)
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, torch.zeros(N, 1, dtype=torch.uint8)], dim=1)
    indices = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    return values, indices


# The order native/sparse.h reads a row's values in: within each whole block of 32 inputs (16
# values, one 32-bit index word), each 8 values as [0, 1, 4, 5, 2, 3, 6, 7]. The row kernel's
# in-lane permutes pick from one 128-bit half (4 inputs, a group) per lane, so a 256-bit result
# holds groups 0 and 2 in its low half and 1 and 3 in its high half; the values are stored that
# way once rather than shuffled back on every read. The last K % 32 inputs stay in input order.
KERNEL_ORDER = (0, 1, 4, 5, 2, 3, 6, 7)


def pack_two_four_for_kernels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_two_four`'s (values, indices) with the values in native/sparse.h's order
    (KERNEL_ORDER); the indices, and so the positions, are the file's."""
    values, indices = pack_two_four(weight)
    N, K = weight.shape
    whole = K // 32 * 16
    order = torch.tensor(KERNEL_ORDER)
    blocks = values[:, :whole].reshape(N, whole // 8, 8)[:, :, order].reshape(N, whole)
    return torch.cat([blocks, values[:, whole:]], dim=1).contiguous(), indices


def unpack_two_four(values: torch.Tensor, indices: torch.Tensor, K: int, name: str = "the matrix") -> torch.Tensor:
    """The dense (N, K) matrix of `pack_two_four`'s output; corrupt indices are one clear error."""
    N = values.shape[0]
    G = K // 4
    if K % 4 or values.shape != (N, K // 2) or indices.dtype != torch.uint8 or indices.shape != (N, (G + 1) // 2):
        raise LmforgeError(f"{name}: 2:4 tensors of shapes {tuple(values.shape)} and {tuple(indices.shape)} "
                           f"({indices.dtype}) do not describe a matrix of {K} inputs; re-create it with lmforge prune")
    nibbles = torch.stack([indices & 15, indices >> 4], dim=-1).reshape(N, -1)[:, :G].to(torch.int64)
    first, second = nibbles & 3, nibbles >> 2
    if bool((first >= second).any()):
        row, group = (first >= second).nonzero()[0].tolist()
        raise LmforgeError(f"{name}: corrupt 2:4 index at row {row}, group {group} (positions {int(first[row, group])} "
                           f"and {int(second[row, group])}, must increase); the file is damaged: re-create it")
    dense = torch.zeros(N, G, 4, dtype=values.dtype)
    dense.scatter_(-1, torch.stack([first, second], dim=-1), values.reshape(N, G, 2))
    return dense.reshape(N, K)


_BITS = 1 << torch.arange(8, dtype=torch.uint8)


def pack_bitmap(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values: the nonzeros row by row, bitmap (N, ceil(K/8)) uint8)."""
    N, K = weight.shape
    mask = weight != 0
    padded = torch.cat([mask, torch.zeros(N, -K % 8, dtype=torch.bool)], dim=1).reshape(N, -1, 8)
    bitmap = (padded.to(torch.uint8) * _BITS).sum(-1, dtype=torch.uint8)
    return weight[mask].contiguous(), bitmap.contiguous()


def unpack_bitmap(values: torch.Tensor, bitmap: torch.Tensor, K: int, name: str = "the matrix") -> torch.Tensor:
    N = bitmap.shape[0]
    if bitmap.dtype != torch.uint8 or bitmap.shape != (N, (K + 7) // 8) or values.dim() != 1:
        raise LmforgeError(f"{name}: bitmap of shape {tuple(bitmap.shape)} does not describe a matrix of {K} inputs; "
                           "re-create it with lmforge prune")
    mask = ((bitmap[..., None] & _BITS) != 0).reshape(N, -1)
    if bool(mask[:, K:].any()) or int(mask.sum()) != values.numel():
        raise LmforgeError(f"{name}: the bitmap marks {int(mask[:, :K].sum())} nonzeros but {values.numel()} values "
                           "are stored; the file is damaged: re-create it")
    dense = torch.zeros(N, K, dtype=values.dtype)
    dense[mask[:, :K]] = values
    return dense
