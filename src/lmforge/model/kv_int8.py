"""A KV cache that stores keys and values as int8, with one scale per (token, head).

Each new key (and value) vector of head_dim numbers is stored as round(x / s) in int8 with
s = max|x| / 127, its own scale kept in the model's dtype beside it. Scaling per vector keeps
an outlier in one token or head from costing the others their precision, and needs no
calibration: a token is quantized once, when it is written. Attention reads the slots filled
so far dequantized (int8 * scale) one layer at a time, so the transient float copy is one
layer's, and the cache itself takes (1 + scale bytes / head_dim) bytes per number: about a
quarter of an fp32 cache, about half of a bf16/fp16 one.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

from lmforge.model.kv_cache import KVCache

KV_CACHE_DTYPES = ("auto", "int8")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-vector scales (..., 1) of x (..., d): x ~= q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(x.dtype)


class Int8KVCache(KVCache):
    def allocate(self, n_layer: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        self.dtype = dtype
        self.k = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(n_layer)]
        scale_shape = (*shape[:-1], 1)
        self.k_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_layer)]

    def storage(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, *self.k_scale, *self.v_scale]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize this step's keys/values into their slots; all filled slots, dequantized."""
        start, end = self.length, self.length + k.shape[2]
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_rows(x)
            store[layer][:, :, start:end] = q
            scales[layer][:, :, start:end] = s
        return self.read(layer, end)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(store[layer][:, :, :end].to(self.dtype) * scales[layer][:, :, :end]
                     for store, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))


def new_cache(model: torch.nn.Module, batch: int, capacity: int | None = None,
              kv_cache_dtype: str = "auto") -> KVCache:
    """`model.new_cache`, or with `kv_cache_dtype="int8"` an `Int8KVCache` of the same shape."""
    if kv_cache_dtype == "auto":
        return model.new_cache(batch, capacity)
    if kv_cache_dtype != "int8":
        raise LmforgeError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    cfg, p = model.config, model.tok_emb.weight
    return Int8KVCache(cfg.n_layer, batch, cfg.kv_heads, cfg.dim_head, capacity or cfg.context, p.dtype, p.device)
