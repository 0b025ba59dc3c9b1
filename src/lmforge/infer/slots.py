"""A key/value cache with one slot per sequence, each at its own length (continuous batching).

`KVCache` (model/kv_cache.py) gives a batch one shared write cursor, which suits a fixed
batch started together. A serving engine instead admits and retires sequences at every
step, so here every slot keeps its own length. The engine keeps its running sequences in
slots 0..n-1 (it compacts when one leaves), so a decode step works on the plain view
`[:n]` and never gathers rows.

The object speaks the interface `Transformer.hidden_states` expects of a cache
(`length`, `positions`, `attention_mask`, `update`, `advance`); before each forward the
engine says which rows it runs: `bind_prefill(slot, t)` for one new sequence's prompt,
`bind_decode(n)` for one token in each of slots 0..n-1.

`Int8SlotCache` stores keys and values as int8 (`serve --kv-cache-dtype int8`), as
model/kv_int8.py does for `generate`.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.model.kv_int8 import KV_CACHE_DTYPES, quantize_rows


class SlotCache:
    def __init__(self, n_layer: int, slots: int, n_kv_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (slots, n_kv_head, capacity, head_dim)
        self.k = [self._allocate(shape, dtype, device) for _ in range(n_layer)]
        self.v = [self._allocate(shape, dtype, device) for _ in range(n_layer)]
        self.capacity = capacity
        self.device = torch.device(device)
        self.lengths = [0] * slots
        self._rows = slice(0, 0)
        self._starts: list[int] = []
        self._t = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, capacity: int | None = None) -> "SlotCache":
        own = getattr(model, "new_slot_cache", None)
        if own is not None:  # a model split over processes caches its own key/value heads (serve.tensor_parallel)
            return own(slots, capacity)
        cfg = model.config
        p = model.tok_emb.weight
        return cls(cfg.n_layer, slots, cfg.kv_heads, cfg.dim_head, capacity or cfg.context, p.dtype, p.device)

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """One layer's keys (or values)."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """(n, h, t, d) keys or values as this cache stores them."""
        return x

    def _read(self, stored: torch.Tensor) -> torch.Tensor:
        """The keys or values that stored rows hold."""
        return stored

    def nbytes(self) -> int:
        """Bytes the cache holds (as `KVCache.nbytes`)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def slots(self) -> int:
        return len(self.lengths)

    # -- what the engine calls ---------------------------------------------------------------
    def bind_prefill(self, slot: int, t: int, start: int = 0) -> None:
        """The next forward writes t prompt tokens into `slot` after its first `start` tokens
        (0: a fresh prompt; more: the slot already holds a cached prefix of the prompt)."""
        self.lengths[slot] = start
        self._bind(slice(slot, slot + 1), t)

    def bind_decode(self, n: int) -> None:
        """The next forward feeds one token to each of slots 0..n-1."""
        self._bind(slice(0, n), 1)

    def _bind(self, rows: slice, t: int) -> None:
        self._rows, self._t = rows, t
        self._starts = self.lengths[rows]
        if max(self._starts) + t > self.capacity:
            raise ValueError(f"KV cache slot full: {max(self._starts)} + {t} tokens exceed its capacity of {self.capacity}")

    def move(self, src: int, dst: int) -> None:
        """Copy a sequence from slot `src` to slot `dst` (compaction after others left)."""
        n = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    # -- what Transformer.hidden_states calls ------------------------------------------------
    @property
    def length(self) -> int:
        """0 only for a prompt written into an empty slot: then plain causal attention is right."""
        return max(self._starts)

    def positions(self, pad_mask: torch.Tensor | None, t: int) -> torch.Tensor:
        if pad_mask is not None:
            raise ValueError("a SlotCache takes no pad_mask: each slot has its own length")
        starts = torch.tensor(self._starts, device=self.device)
        return starts[:, None] + torch.arange(t, device=self.device)[None, :]  # (n, t)

    def attention_mask(self, t: int, window: int | None) -> torch.Tensor | None:
        starts = self._starts
        end = max(starts) + t
        same_length = min(starts) == max(starts)
        if same_length and (t == 1 or starts[0] == 0) and (window is None or end <= window):
            return None  # causal over all slots: exactly what a lone sequence computes
        if t > 1:  # a prompt into one slot: longer than the sliding window, or after a cached prefix
            q_slot = starts[0] + torch.arange(t, device=self.device)[:, None]
            k_slot = torch.arange(end, device=self.device)[None, :]
            allowed = k_slot <= q_slot
            if window is not None:
                allowed = allowed & (k_slot > q_slot - window)
            return allowed[None, None]  # (1, 1, t, end)
        k_slot = torch.arange(end, device=self.device)[None, :]  # (1, end)
        pos = torch.tensor(starts, device=self.device)[:, None]  # (n, 1): the new token's slot
        allowed = k_slot <= pos
        if window is not None:
            allowed = allowed & (k_slot > pos - window)
        return allowed[:, None, None, :]  # (n, 1, 1, end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (n, h, t, d) keys/values and return views over every filled slot."""
        rows, t = self._rows, self._t
        end = max(self._starts) + t
        k, v = self._stored(k), self._stored(v)
        K, V = self.k[layer], self.v[layer]
        if t > 1 or len(set(self._starts)) == 1:
            s = self._starts[0]
            K[rows, :, s:s + t] = k
            V[rows, :, s:s + t] = v
        else:
            row_idx = torch.arange(rows.start, rows.stop, device=self.device)
            col_idx = torch.tensor(self._starts, device=self.device)
            K[row_idx, :, col_idx] = k[:, :, 0]
            V[row_idx, :, col_idx] = v[:, :, 0]
        return self._read(K[rows, :, :end]), self._read(V[rows, :, :end])

    def advance(self, t: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += t


class Int8SlotCache(SlotCache):
    """Keys and values as int8, one scale per (token, head) vector (`kv_int8.quantize_rows`),
    in the model's dtype. The scale's bytes are stored after its vector's, in the same int8
    row, so what copies rows (a slot's move, the prefix cache's blocks) copies the scales
    with them. Attention reads the filled slots dequantized, one layer at a time."""

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        self.dtype, self.head_dim = dtype, shape[-1]
        return torch.zeros((*shape[:-1], shape[-1] + dtype.itemsize), dtype=torch.int8, device=device)

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows(x)
        return torch.cat((q, scale.view(torch.int8)), dim=-1)

    def _read(self, stored: torch.Tensor) -> torch.Tensor:
        scale = stored[..., self.head_dim:].contiguous().view(self.dtype)
        return stored[..., :self.head_dim].to(self.dtype) * scale


def new_slot_cache(model: torch.nn.Module, slots: int, kv_cache_dtype: str = "auto") -> SlotCache:
    """The engine's slot cache for `model`: `SlotCache.for_model`, or with `kv_cache_dtype="int8"`
    an `Int8SlotCache`."""
    if kv_cache_dtype == "auto":
        return SlotCache.for_model(model, slots)
    if kv_cache_dtype != "int8":
        raise LmforgeError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if hasattr(model, "new_slot_cache"):
        raise LmforgeError("--tp does not support --kv-cache-dtype int8 yet")
    return Int8SlotCache.for_model(model, slots)
