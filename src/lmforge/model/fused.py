"""The forward without autograd on the CPU in fp32 (a prefill, scoring): faster ops, same math.

A long prompt's prefill spends its time in matmuls and attention, and what PyTorch runs
between them (RMSNorm, RoPE, SwiGLU, residual adds) streams each (tokens, width) tensor
several times over. With autograd off, on the CPU, in fp32, `lmforge.model.transformer` hands
that work to the one-pass kernels of `lmforge/native/prefill.c`:

- `rms_norm` and `add_rms_norm` (the residual add folded into the norm after it);
- `rope_` rotates the queries and keys in place inside the fused qkv projection's output;
- `silu_mul`: SwiGLU's silu(gate) * up from the fused gate/up projection's output.

`linear` runs a plain `nn.Linear` through oneDNN's matmul (`lmforge.native.onednn`), in
training too (its gradients as well), from a few rows on.

`enabled(x)` says where they apply; elsewhere (training, a GPU, bf16, tracing for export,
no C compiler) the model runs PyTorch's ops, which the kernels equal to fp32 rounding.

Causal attention (a whole prompt, or a chunk of one after the chunks before it:
`CausalAfter`, which SDPA would need a dense mask for, and then compute every query against
every key) runs per block of queries as two oneDNN matmuls around the causal softmax kernel,
each block against the keys up to its last query only. Without the kernels a `CausalAfter`
chunk is two calls of PyTorch's flash kernel, the earlier keys unmasked and the chunk's own
keys causal, merged by their log-sum-exps.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module

from lmforge import native
from lmforge.native import onednn

PARALLEL_MIN = 1 << 16  # elements below which one thread beats starting the team
_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "rmsnorm_rows": ([_p, _p, _p, _p, _p, _i64, _i, _f, _i], None),
    "rope_rows": ([_p, _i64, _i64, _i64, _i64, _i, _i, _p, _p, _i64, _i], None),
    "silu_mul_rows": ([_p, _p, _i64, _i, _i], None),
    "causal_softmax_rows": ([_p, _i64, _i64, _i64, _i64, _i64, _f, _i], None),
}
ATTENTION_BLOCK = 128  # queries per block: a block's scores against all keys stay in the cache


def kernels() -> ctypes.CDLL | None:
    """The built kernels with prefill.c's functions typed, or None where they cannot run (no
    compiler, LMFORGE_NATIVE=0, a CPU without AVX2)."""
    lib = native.kernels()
    if lib is None:
        return None
    if not hasattr(lib, "_prefill_width"):
        supported = getattr(lib, "prefill_supported", None)  # None: a library built without prefill.c
        if supported is not None:
            supported.restype = _i
        lib._prefill_width = supported() if supported is not None else 0
        if lib._prefill_width:
            for name, (args, result) in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result
    return lib if lib._prefill_width else None


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels apply to these tensors (`onednn.inference`: autograd off, plain fp32 CPU tensors, nothing tracing; and the kernels built)."""
    return onednn.inference(*tensors) and kernels() is not None


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; for a plain `nn.Linear` without hooks (a LoRA or calibration hook, a
    quantized or sharded layer all keep their own forward) through `onednn.linear`."""
    if (type(layer) is nn.Linear
            and not (layer._forward_hooks or layer._forward_pre_hooks
                     or _module._global_forward_hooks or _module._global_forward_pre_hooks)):
        return onednn.linear(x, layer.weight, layer.bias)
    return layer(x)


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= PARALLEL_MIN else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension, in one pass."""
    x = x.contiguous()
    y = torch.empty_like(x)
    kernels().rmsnorm_rows(x.data_ptr(), None, None, y.data_ptr(), weight.contiguous().data_ptr(),
                           x.numel() // x.shape[-1], x.shape[-1], eps, _threads(x.numel()))
    return y


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, weight * s / rms(s)) with s = x + a, in one pass (x and a are left as they are)."""
    x, a = x.contiguous(), a.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    kernels().rmsnorm_rows(x.data_ptr(), a.data_ptr(), s.data_ptr(), y.data_ptr(), weight.contiguous().data_ptr(),
                           x.numel() // x.shape[-1], x.shape[-1], eps, _threads(x.numel()))
    return s, y


def rope_applies(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether `rope_` can rotate this (B, T, width) projection output with these tables."""
    cos, sin = rope
    return (qkv.dim() == 3 and qkv.stride(-1) == 1 and enabled(qkv, cos, sin)
            and cos.shape == sin.shape and cos.is_contiguous() and sin.is_contiguous()
            and cos.dim() in (2, 4) and cos.shape[-2] == qkv.shape[1] and (cos.dim() == 2 or cos.shape[1] == 1))


def rope_(qkv: torch.Tensor, heads: int, head_dim: int, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rotate the first `heads` heads of every token of `qkv` (B, T, width) in place: the query
    and key heads of the fused projection. `rope` is the model's (cos, sin): (T, head_dim) for
    every row alike, or (B, 1, T, head_dim) per row."""
    cos, sin = rope
    B, T, _ = qkv.shape
    kernels().rope_rows(qkv.data_ptr(), B, T, qkv.stride(0), qkv.stride(1), heads, head_dim, cos.data_ptr(),
                        sin.data_ptr(), 0 if cos.dim() == 2 else cos.stride(0), _threads(B * T * heads * head_dim))


def silu_mul(h: torch.Tensor, hidden: int) -> torch.Tensor:
    """silu(gate) * up where each row of `h` (..., 2 hidden) is gate then up."""
    h = h.contiguous()
    out = h.new_empty(*h.shape[:-1], hidden)
    kernels().silu_mul_rows(h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], hidden, _threads(out.numel()))
    return out


class CausalAfter:
    """The mask of a chunk of T queries placed after `start` cached tokens: query i sees keys
    0..start+i, every row of the batch alike."""

    def __init__(self, start: int):
        self.start = start

    def dense(self, T: int, device) -> torch.Tensor:
        """The same as a boolean (1, 1, T, start + T) mask."""
        return torch.ones(T, self.start + T, dtype=torch.bool, device=device).tril(self.start)[None, None]


def causal_after(mask: torch.Tensor | None, T: int) -> CausalAfter | None:
    """`mask` (b, 1, T, S) as a `CausalAfter` when that is exactly what it says and the flash
    kernel can take it (autograd off, CPU, nothing tracing); None otherwise."""
    if (mask is None or T < 2 or mask.dtype != torch.bool or mask.device.type != "cpu" or torch.is_grad_enabled()
            or onednn.tracing()
            or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != T or mask.shape[3] <= T):
        return None
    shape = CausalAfter(mask.shape[3] - T)
    return shape if bool((mask == shape.dense(T, mask.device)).all()) else None


def attention(q, k, v, mask, is_causal: bool, dropout: float, enable_gqa: bool, scale: float | None) -> torch.Tensor:
    """SDPA; causal attention in blocks through oneDNN where it applies, a `CausalAfter` mask
    otherwise as two flash calls merged by their log-sum-exps."""
    start = mask.start if isinstance(mask, CausalAfter) else 0 if is_causal and mask is None else None
    if start is not None and dropout == 0.0 and onednn.AVAILABLE and enabled(q, k, v) and (scale is None or scale > 0):
        return blocked_causal_attention(q, k, v, start, scale)
    if not isinstance(mask, CausalAfter):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                              enable_gqa=enable_gqa, scale=scale)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    start = mask.start
    before, lse_before = flash(q, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scale)
    own, lse_own = flash(q, k[:, :, start:], v[:, :, start:], 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_before, lse_own)
    weight_before, weight_own = (lse_before - lse).exp_().unsqueeze(-1), (lse_own - lse).exp_().unsqueeze(-1)
    return before.mul_(weight_before.to(before.dtype)).addcmul_(own, weight_own.to(own.dtype))


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             scale: float | None) -> torch.Tensor:
    """Attention of queries (B, h, T, d) placed after `start` cached tokens to keys and values
    (B, kv, start + T, d), query i seeing keys 0..start+i; (B, h, T, d), laid out as (B, T, h, d)
    in memory (what the output projection reads). Per batch row, KV head and block of queries,
    the group's query heads together: scores by one matmul, the causal softmax in place, one
    matmul with the values."""
    B, h, T, d = q.shape
    kv = k.shape[1]
    group = h // kv
    scale = scale if scale is not None else d ** -0.5
    lib = kernels()
    mm = torch.ops.mkldnn._linear_pointwise
    y = q.new_empty(B, T, h, d).transpose(1, 2)
    for b in range(B):
        for g in range(kv):
            keys, values = k[b, g].contiguous(), v[b, g]
            heads = slice(g * group, (g + 1) * group)
            for i in range(0, T, ATTENTION_BLOCK):
                n = min(ATTENTION_BLOCK, T - i)
                cols = start + i + n  # the keys this block's last query sees
                scores = mm(q[b, heads, i:i + n].reshape(group * n, d), keys[:cols], None, "none", [], "")
                lib.causal_softmax_rows(scores.data_ptr(), group * n, n, cols, cols, start + i, scale,
                                        _threads(scores.numel()))
                out = mm(scores, values[:cols].T.contiguous(), None, "none", [], "")
                y[b, heads, i:i + n] = out.view(group, n, d)
    return y
