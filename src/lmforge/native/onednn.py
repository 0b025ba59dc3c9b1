"""The CPU's fp32 matmuls through oneDNN, in inference and in training.

PyTorch multiplies fp32 matrices with the BLAS it was built with (MKL), which on AMD CPUs runs
its AVX2 code where oneDNN, also in PyTorch, runs AVX-512 (and, capped at AVX2, still beats
it but at the weight gradient). On plain fp32 CPU tensors, nothing tracing the model and autocast off, `linear` takes
oneDNN's: `matmul` with autograd off, `_Linear` (forward and both gradients through oneDNN)
with it on; elsewhere `F.linear` (a GPU, bf16 or autocast, a DTensor or other subclass,
export). `matmul` is also the many-row path of quantized layers (`lmforge.compress.qlinear`).

LMFORGE_ONEDNN=0 in the environment turns these off: every matmul here is then `F.linear`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
SWITCH = "LMFORGE_ONEDNN"


@functools.cache
def _avx512() -> bool:
    """Whether PyTorch (and so MKL and oneDNN beside it) runs AVX-512 code on this CPU."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def min_rows() -> int:
    """The fewest rows `linear` sends to oneDNN: below them a oneDNN call's fixed cost outweighs
    its faster arithmetic (decode-size calls). MKL's AVX2 code does well on few rows, so the
    crossover lies further out where PyTorch runs AVX2 (benchmarks/RESULTS.md)."""
    return 4 if _avx512() else 32


# A weight this large is read from memory, not cache, and oneDNN streams it faster than MKL
# even for one row (a last token's output layer; benchmarks/RESULTS.md).
ONE_ROW_MIN_WEIGHT = 1 << 21


def switched_on() -> bool:
    """oneDNN is available and not turned off by LMFORGE_ONEDNN=0."""
    return AVAILABLE and os.environ.get(SWITCH, "1") != "0"


def plain(t: torch.Tensor) -> bool:
    """An ordinary fp32 CPU tensor (not a DTensor or other subclass)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32


def tracing() -> bool:
    """Whether the model is being traced, compiled or exported (its graph must stay PyTorch's ops)."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def inference(*tensors: torch.Tensor) -> bool:
    """Plain fp32 CPU tensors, autograd off, nothing tracing or compiling the model."""
    return not torch.is_grad_enabled() and all(plain(t) for t in tensors) and not tracing()


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _applies(*tensors: torch.Tensor | None) -> bool:
    """oneDNN switched on, plain fp32 CPU tensors (None: an absent bias), autocast off on the
    CPU (it would run `F.linear` in bf16), nothing tracing or compiling the model."""
    return (switched_on() and all(t is None or plain(t) for t in tensors) and not torch.is_autocast_enabled("cpu")
            and not tracing())


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN's matmul in inference on plain fp32 tensors."""
    if not torch.is_grad_enabled() and _applies(x, weight, bias):
        return _mm(x, weight, bias)
    return F.linear(x, weight, bias)


def grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight ((rows, out) @ (out, in)): the gradient of a linear's input; by oneDNN
    where it applies."""
    return _grad_input(grad, weight) if _applies(grad, weight) else grad @ weight


def grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad.T @ x ((out, rows) @ (rows, in)): the gradient of a linear's weight; by oneDNN where
    it applies."""
    return _grad_weight(grad, x) if _applies(grad, x) else grad.t() @ x


def _grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _mm(grad, weight.t())


def _grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not _avx512():  # capped at AVX2, oneDNN's weight gradient is no faster than MKL's
        with torch.autocast("cpu", enabled=False):
            return grad.t() @ x
    # oneDNN copies a strided input but not a strided weight (it reorders weights anyway), so the
    # transposed operand taken as input is the narrower one: a transpose copy of a wide gradient
    # (the output layer's) costs more than the matmul gains. The result is transposed back.
    if grad.shape[1] > x.shape[1]:
        return _mm(x.t(), grad.t()).t().contiguous()
    return _mm(grad.t(), x.t())


class _Linear(torch.autograd.Function):
    """x @ weight.T (+ bias) with the forward and the gradients of x and weight by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        # The forward ran oneDNN on plain fp32 tensors, so the gradients do too (even where
        # backward() is called inside an autocast region).
        dx = _grad_input(grad, weight).view(x.shape) if need_x else None
        dw = _grad_weight(grad, x.reshape(-1, x.shape[-1])) if need_weight else None
        db = grad.sum(0) if need_bias and ctx.has_bias else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through oneDNN where that is safe and faster: from `min_rows()`
    rows on, or any rows for a weight of `ONE_ROW_MIN_WEIGHT` elements or more; in inference
    (`matmul`) and in training (`_Linear`)."""
    if (not _applies(x, weight, bias) or x.dim() == 0 or x.numel() == 0
            or (x.numel() < min_rows() * x.shape[-1] and weight.numel() < ONE_ROW_MIN_WEIGHT)):
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():
        return _mm(x, weight, bias)
    return _Linear.apply(x, weight, bias)
