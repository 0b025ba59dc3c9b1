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

An adapter is kept as one (A, B) pair per linear it updates: A (R, in) stacks the rank-r A
matrices of the linear's targeted slices (R = r * slices), B (out, R) places each slice's B at
its rows, zeros elsewhere, with the scaling folded in. B's zeros cost a few multiplications
per row and let one dense pair serve any mix of targeted modules and ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

_keys = itertools.count()


@dataclass(eq=False)
class LoraAdapter:
    """One adapter ready to decode with: its served name and {linear name: (A, B)}."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    key: int = field(default_factory=lambda: next(_keys))  # unique per load: keys its prompts' cached KV
    users: int = 0  # sequences submitted with it and not finished (the engine counts them)
    removed: bool = False  # unloaded: no new requests; dropped once `users` is 0

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values())


def dense_pair(out_features: int, slices: list[tuple[int, int]], a: list[torch.Tensor], b: list[torch.Tensor],
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear's (A (R, in), B (out, R)) from its targeted slices: slices[i] = (first row,
    rows), a[i] (r, in) and b[i] (rows, r) that slice's matrices."""
    r = a[0].shape[0]
    big_a = torch.cat([m.float() for m in a]).contiguous()
    big_b = torch.zeros(out_features, r * len(slices))
    for i, (start, size) in enumerate(slices):
        big_b[start:start + size, i * r:(i + 1) * r] = b[i].float() * scaling
    return big_a, big_b.contiguous()


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
                pair = adapter.layers.get(name)
                if pair is not None:
                    a, b = pair
                    if len(rows) == x.shape[0]:
                        out = out + (x @ a.t().to(x.dtype)) @ b.t().to(x.dtype)
                    else:
                        out[rows] += (x[rows] @ a.t().to(x.dtype)) @ b.t().to(x.dtype)
            return out
        return add_updates

    try:
        for name in sorted(names):
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
