"""GELU (tanh form) for the gpt2 family's MLP.

On the CPU, in fp32 or bf16 (autocast), it runs as a C kernel (lmforge/native/elementwise.c)
forward and backward, several times faster than PyTorch's own there (figures in
benchmarks/RESULTS.md). Elsewhere (a GPU, fp16,
tracing for export or compilation, no C compiler) it is `F.gelu(x, approximate="tanh")`;
the two agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lmforge import native

PARALLEL_MIN = 1 << 16  # elements below which one thread beats starting the team


def _bf16(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= PARALLEL_MIN else 1


class _NativeGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        native.elementwise().gelu_forward(x.data_ptr(), y.data_ptr(), x.numel(), _bf16(x), _threads(x.numel()))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        dy = dy.to(x.dtype).contiguous()
        native.elementwise().gelu_backward(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), _bf16(x),
                                           _threads(x.numel()))
        return dx


def _native_applies(x: torch.Tensor) -> bool:
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous()
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
            and native.elementwise() is not None)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return _NativeGelu.apply(x) if _native_applies(x) else F.gelu(x, approximate="tanh")
