"""Many LoRA adapters over one base model, in one batch: each row of a step decodes with its
own adapter (or none) while the base weights are read once for all of them.

A LoRA adapter changes a linear's output by `scaling * B @ (A @ x)` on some slices of its
output rows (`lmforge.model.lora`). Merging it into the weights would need a model copy per
adapter, and rows of different adapters could no longer share a matmul. Here the base matmul
runs for the whole batch, then each row adds its own adapter's low-rank update, with rows
grouped by adapter so that each adapter's A and B are read once per step (the segmented
matmul of S-LoRA and Punica). In the native decoder the update is decode.c's
`lora_update`; on the PyTorch path (long prompts' prefill, echo, --reference-path) forward
hooks on the block linears add it (`rows_with_adapters`).

An adapter is kept as one `LoraUpdate` per linear it updates: the A matrices of the linear's
targeted slices stacked (one matmul makes every slice's A x) and each slice's B^T, the
scaling folded in. B^T rows are contiguous runs of the slice's output rows, so the update adds
whole rows of it to the output; any mix of targeted modules and ranks works.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

_keys = itertools.count()


@dataclass
class LoraUpdate:
    """One adapter's update of one linear: output rows cols[s, 0] .. + cols[s, 1] - 1 (slice s)
    gain (A_s x) @ B_s^T. `a` (S * r, in) stacks the A_s; `bt` holds the B_s^T (r, rows) one
    after the other, flat."""

    r: int
    a: torch.Tensor
    bt: torch.Tensor
    cols: torch.Tensor  # (S, 2) int32: first row and row count of each slice

    def slices(self) -> list[tuple[int, int, torch.Tensor]]:
        """(first row, rows, B_s^T) per slice."""
        out, at = [], 0
        for start, size in self.cols.tolist():
            out.append((start, size, self.bt[at:at + self.r * size].view(self.r, size)))
            at += self.r * size
        return out


@dataclass(eq=False)
class LoraAdapter:
    """One adapter ready to decode with: its served name and {linear name: its update}."""

    name: str
    layers: dict[str, LoraUpdate]
    key: int = field(default_factory=lambda: next(_keys))  # unique per load: keys its prompts' cached KV
    users: int = 0  # sequences submitted with it and not finished (the engine counts them)
    removed: bool = False  # unloaded: no new requests; dropped once `users` is 0

    @property
    def rank(self) -> int:
        return max(u.r for u in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(u.a.numel() * 4 + u.bt.numel() * 4 for u in self.layers.values())


def lora_update(slices: list[tuple[int, int]], a: list[torch.Tensor], b: list[torch.Tensor],
                scaling: float) -> LoraUpdate:
    """One linear's update from its targeted slices: slices[i] = (first row, rows), a[i] (r, in)
    and b[i] (rows, r) that slice's matrices."""
    return LoraUpdate(a[0].shape[0], torch.cat([m.float() for m in a]).contiguous(),
                      torch.cat([(m.float() * scaling).t().reshape(-1) for m in b]).contiguous(),
                      torch.tensor(slices, dtype=torch.int32).reshape(-1, 2).contiguous())


def _groups(adapters: list[LoraAdapter | None]) -> list[tuple[LoraAdapter, torch.Tensor]]:
    """Each adapter that some row uses, with the indices of its rows."""
    rows: dict[int, tuple[LoraAdapter, list[int]]] = {}
    for i, adapter in enumerate(adapters):
        if adapter is not None:
            rows.setdefault(id(adapter), (adapter, []))[1].append(i)
    return [(adapter, torch.tensor(idx)) for adapter, idx in rows.values()]


@contextmanager
def rows_with_adapters(model: nn.Module, adapters: list[LoraAdapter | None]) -> Iterator[None]:
    """Within the block, row i of the batch that `model` runs (its first dimension) decodes
    with adapters[i] (None: the base alone): forward hooks on the linears some adapter updates
    add that adapter's update to its rows' outputs."""
    groups = _groups(adapters)
    names = {name for adapter, _ in groups for name in adapter.layers}
    handles = []

    def hook(name: str):
        def add_updates(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            for adapter, rows in groups:
                update = adapter.layers.get(name)
                if update is None:
                    continue
                whole = len(rows) == x.shape[0]
                h = (x if whole else x[rows]) @ update.a.t().to(x.dtype)
                for s, (start, size, bt) in enumerate(update.slices()):
                    delta = h[..., s * update.r:(s + 1) * update.r] @ bt.to(x.dtype)
                    if whole:
                        out[..., start:start + size] += delta
                    else:
                        out[rows, ..., start:start + size] += delta
            return out
        return add_updates

    try:
        for name in sorted(names):
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
