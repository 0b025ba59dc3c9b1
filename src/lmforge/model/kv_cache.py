"""A pre-allocated key/value cache, updated in place.

One tensor pair per layer of shape (B, n_kv_head, capacity, head_dim). Rows of a batch
share one write cursor (`length`); prompts of different lengths are left-padded and the
padding slots are marked invalid in `valid`, so a row's position is the count of its
valid slots, not its slot index.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.allocate(n_layer, (batch, n_kv_head, capacity, head_dim), dtype, device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0
        self.has_padding = False

    def allocate(self, n_layer: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        """The key and value tensors of every layer (a quantized cache stores them otherwise)."""
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    def nbytes(self) -> int:
        """Bytes the cache's key/value storage takes."""
        return sum(t.numel() * t.element_size() for t in self.storage())

    def storage(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def positions(self, pad_mask: torch.Tensor | None, t: int) -> torch.Tensor:
        """Positions (B, t) of the next t tokens, and mark their slots valid (pad_mask False = padding)."""
        start = self.length
        if start + t > self.capacity:
            raise ValueError(f"KV cache full: {start} + {t} tokens exceed its capacity of {self.capacity}")
        new_valid = torch.ones(self.batch, t, dtype=torch.bool, device=self.valid.device) if pad_mask is None else pad_mask.bool()
        if pad_mask is not None and not bool(new_valid.all()):
            self.has_padding = True
        self.valid[:, start:start + t] = new_valid
        seen = self.valid[:, :start].sum(dim=1, keepdim=True) if self.has_padding else start
        # Left padding would get position -1: clamp it (its slots are masked anyway), since a
        # learned position table (gpt2) cannot be indexed with it.
        return (seen + torch.cumsum(new_valid.long(), dim=1) - 1).clamp_(min=0)

    def attention_mask(self, t: int, window: int | None) -> torch.Tensor | None:
        """Boolean (B, 1, t, length+t) mask of the slots each new query may attend to, or None
        when plain causal attention over all slots is right (the common decode case)."""
        start, end = self.length, self.length + t
        if (t == 1 or start == 0) and not self.has_padding and (window is None or end <= window):
            return None
        dev = self.valid.device
        q_slot = torch.arange(start, end, device=dev)[:, None]
        k_slot = torch.arange(end, device=dev)[None, :]
        allowed = k_slot <= q_slot
        if window is not None:
            allowed = allowed & (k_slot > q_slot - window)
        mask = allowed[None] & self.valid[:, None, :end]
        # A padding query would attend to nothing (NaN); let it see its own slot.
        mask = mask | (k_slot == q_slot)[None]
        return mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, h, t, d) keys/values and return views over all filled slots."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t
