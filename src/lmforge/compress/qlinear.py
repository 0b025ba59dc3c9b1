"""Quantized linear layers: the modules that replace `nn.Linear` in a quantized `Transformer`.

Three formats, chosen by measurement (benchmarks/lowbit_kernels.py, docs/compress.md):

- `int8`  weight-only, one scale per output channel. Decoding (few rows) runs the native
          kernel in `qmatmul.c`, which quantizes the activations in blocks of 32 on the fly
          and multiplies int8 by int8, as llama.cpp does.
- `int4`  weight-only, asymmetric, groups of `group_size` inputs (a multiple of 32):
          W = scale * (q - zero), q in 0..15, two per byte. Same kernel.
- `w8a8`  int8 weights per channel and int8 activations quantized per call (fbgemm's
          dynamic quantized linear): the fastest for batch work, slightly less accurate.

Many rows at once (a prompt, an evaluation batch), above `DEQUANT_ROWS`, take the same
kernels' integer GEMM in inference (`qgemm`: the same int8-activation math, the weight read
once for all the rows); where it does not apply (autograd on, a width it does not take, a CPU
without VNNI that multiplies fp32 faster) the weight is dequantized and multiplied in fp32.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import native
from lmforge.errors import LmforgeError
from lmforge.native import onednn

STORED_METHODS = ("int8", "int4", "w8a8")  # gptq is stored as int4
DEQUANT_ROWS = 16  # above this many rows the GEMM (or a BLAS matmul on the dequantized weight) wins
CHUNK = 32  # int4 weights are packed in runs of 32
# Narrower layers leave the GEMM's fixed cost per tile (its reductions, the int4 zero points) a
# large share, and at a few hundred rows the dequantized matmul is faster (benchmarks/RESULTS.md)
GEMM_MIN_IN_FEATURES = {8: 256, 4: 512}


# ----------------------------------------------------------------------------- quantizers

ROW_BLOCK_VALUES = 1 << 22  # weights rounded at a time: a vocabulary-sized matrix needs no full-size fp32 temporaries


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Slices of whole rows, about ROW_BLOCK_VALUES values each, that cover `rows`."""
    step = max(1, ROW_BLOCK_VALUES // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def abs_max(w: torch.Tensor, dim: int) -> torch.Tensor:
    """max |w| along `dim`, without a full-size |w|."""
    return torch.maximum(w.amax(dim=dim), -w.amin(dim=dim))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q (N, K) int8, scale (N,) fp32)."""
    w = w.detach().float()
    scale = (abs_max(w, 1) / 127.0).clamp(min=1e-12)
    q = torch.empty(w.shape, dtype=torch.int8)
    for rows in row_blocks(*w.shape):
        q[rows] = (w[rows] / scale[rows, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    if group_size <= 0 or group_size % CHUNK:
        raise LmforgeError(f"--group-size must be a positive multiple of {CHUNK} (got {group_size})")
    if in_features % group_size:
        raise LmforgeError(f"{name} has {in_features} inputs, not divisible by the group size {group_size}; "
                           f"choose a group size that divides it (e.g. {CHUNK} if {in_features} % {CHUNK} == 0)")


def int4_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (scale fp32, zero uint8) per group, each (N, K // group_size)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    zero = torch.round(-lo / scale).clamp(0, 15).to(torch.uint8)
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Integer codes 0..15 (N, K) of `w` on a given per-group grid: W ~ scale * (q - zero)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    q = torch.empty(N, K, dtype=torch.uint8)
    for rows in row_blocks(N, K):
        codes = (g[rows] / scale[rows, :, None]).round_().add_(zero[rows, :, None].float()).clamp_(0, 15)
        q[rows] = codes.reshape(-1, K)
    return q


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) bytes; in each run of 32, byte j = q[j] | q[j+16] << 4."""
    N, K = q.shape
    runs = q.reshape(N, K // CHUNK, 2, CHUNK // 2)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    runs = packed.reshape(N, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat((runs & 15, runs >> 4), dim=2).reshape(N, half * 2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4: (packed (N, K/2) uint8, scale fp32, zero uint8 (N, K/group_size))."""
    check_group_size(w.shape[1], group_size)
    scale, zero = int4_grid(w, group_size)
    return pack_int4(int4_codes(w, scale, zero, group_size)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    N, K = q.shape
    w = (q.reshape(N, K // group_size, group_size) - zero[..., None].float()) * scale[..., None]
    return w.reshape(N, K)


# ----------------------------------------------------------------------------- modules

class QuantizedLinear(nn.Module):
    """A weight-only int8 or int4 `nn.Linear` replacement (see the module docstring).

    Buffers are what the model directory stores: `qweight` (int8 (N, K) or packed uint8
    (N, K/2)), `scales` ((N,) or (N, K/G)), `zeros` (uint8 (N, K/G), int4 only) and an fp32 `bias`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, bias: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else 0
        if bits == 4:
            check_group_size(in_features, group_size)
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(out_features, groups))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features))
            self.zeros = None
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.tied = None  # a tied lm_head: the embedding, which holds exactly this layer's dequantized weight

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                   codes: tuple[torch.Tensor, ...] | None = None) -> "QuantizedLinear":
        """Round-to-nearest quantization of `linear`, or adopt precomputed `codes` (e.g. from GPTQ)."""
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        if codes is None:
            codes = quantize_int4(linear.weight, group_size) if bits == 4 else quantize_int8(linear.weight)
        m.qweight.copy_(codes[0])
        m.scales.copy_(codes[1])
        if bits == 4:
            m.zeros.copy_(codes[2])
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight: for inspection and for code that asks `.weight.device`.
        Free for a tied lm_head (the embedding holds it), a fresh tensor otherwise."""
        return self.tied[0] if self.tied else self.dequantize()

    def dequantize(self) -> torch.Tensor:
        lib = native.kernels()
        if lib is None or self.qweight.device.type != "cpu":  # the C kernel reads host memory
            if self.bits == 8:
                return dequantize_int8(self.qweight, self.scales)
            return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
        w = torch.empty(self.out_features, self.in_features)
        lib.dequant(self.bits, native.ptr(self.qweight), native.ptr(self.scales), native.ptr(self.zeros),
                    self.group_size, self.out_features, self.in_features, native.ptr(w))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        lib = native.kernels()
        kernel = self._kernel(lib, rows)
        if kernel is None:
            return self._dequantized_forward(x, lib)
        rows = rows.contiguous()
        M, K, N = rows.shape[0], self.in_features, self.out_features
        y = torch.empty(M, N)
        failed = kernel(self.bits, native.ptr(rows), M, K, native.ptr(self.qweight), native.ptr(self.scales),
                        native.ptr(self.zeros), self.group_size, N, native.ptr(self.bias), native.ptr(y))
        if failed:  # the GEMM's scratch could not be allocated
            return self._dequantized_forward(x, lib)
        return y.reshape(*lead, N)

    def _kernel(self, lib, rows: torch.Tensor):
        """The native matmul for these rows: the row kernel for a few, the GEMM for many (in
        inference, for the widths and CPUs it takes); None for the dequantized matmul."""
        if (lib is None or self.in_features % CHUNK or rows.dtype != torch.float32 or rows.device.type != "cpu"
                or (rows.requires_grad and torch.is_grad_enabled())):  # the kernels have no backward
            return None
        if rows.shape[0] <= DEQUANT_ROWS:
            return lib.qlinear
        if (onednn.inference(rows, self.scales) and self.qweight.device.type == "cpu"
                and self.in_features >= GEMM_MIN_IN_FEATURES[self.bits]
                and lib.qgemm_supported(self.bits, self.in_features, self.group_size)):
            return lib.qgemm
        return None

    def _dequantized_forward(self, x: torch.Tensor, lib) -> torch.Tensor:
        """`x` through the dequantized weight. In inference the weight is dequantized into a
        buffer reused from layer to layer (a fresh allocation of its size costs the kernel's page
        faults and zeroing, several times the dequantization itself), which nothing can keep:
        autograd is off, and the matmul's output is a new tensor."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if lib is not None and onednn.inference(x, self.scales) and self.qweight.device.type == "cpu":
            w = _reused_weight_buffer(self.out_features, self.in_features)
            if w is not None:
                lib.dequant(self.bits, native.ptr(self.qweight), native.ptr(self.scales), native.ptr(self.zeros),
                            self.group_size, self.out_features, self.in_features, native.ptr(w))
                return onednn.matmul(x, w, bias)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


REUSED_BUFFER_MAX_BYTES = 256 << 20  # larger weights (a quantized output layer) take a fresh allocation
_reused = threading.local()


def _reused_weight_buffer(rows: int, cols: int) -> torch.Tensor | None:
    """This thread's fp32 scratch matrix (rows, cols), grown as needed; None above the cap."""
    need = rows * cols
    if 4 * need > REUSED_BUFFER_MAX_BYTES:
        return None
    buffer = getattr(_reused, "buffer", None)
    if buffer is None or buffer.numel() < need:
        buffer = _reused.buffer = torch.empty(need)
    return buffer[:need].view(rows, cols)


class DynamicInt8Linear(nn.Module):
    """w8a8: per-channel int8 weights (stored like `int8`) and activations quantized per call,
    through fbgemm's prepacked dynamic quantized linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, 8
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None
        self.tied = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.repack())

    @classmethod
    def from_float(cls, linear: nn.Linear, codes: tuple[torch.Tensor, ...] | None = None) -> "DynamicInt8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = codes or quantize_int8(linear.weight)
        m.qweight.copy_(q)
        m.scales.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        m.repack()
        return m

    def repack(self) -> None:
        """fbgemm's packed copy of the weight, rebuilt whenever the stored buffers change."""
        if self.qweight.device.type == "meta":
            return
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing still takes them
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scales.double(), zero, 0)
        self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.tied[0] if self.tied else dequantize_int8(self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.repack()
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 (fbgemm dynamic)"


def matmul_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: each linear's stored weight (+ scales)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, DynamicInt8Linear)):
            total += sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name != "bias")
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total
