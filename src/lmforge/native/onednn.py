"""The fp32 matmul of inference on the CPU, through oneDNN.

PyTorch multiplies fp32 matrices with the BLAS it was built with (MKL), which on AMD CPUs runs
its AVX2 code where oneDNN, also in PyTorch, runs AVX-512. With autograd off, on plain fp32
CPU tensors and nothing tracing the model, `matmul` takes oneDNN's; elsewhere `F.linear`
(training, a GPU, bf16, export). Used by the fused inference forward (`lmforge.model.fused`)
and by quantized layers' many-row path (`lmforge.compress.qlinear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN's matmul in inference on plain fp32 tensors."""
    if AVAILABLE and inference(x, weight) and (bias is None or plain(bias)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
