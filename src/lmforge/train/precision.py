"""The precision a run computes in: `train.dtype` (auto, float32, bfloat16) as an autocast context."""

from __future__ import annotations

import contextlib

import torch


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which oneDNN's
    bf16 matmuls use; without them bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def resolve_dtype(device: torch.device, dtype_name: str) -> str:
    """train.dtype `auto`: bf16 autocast on a GPU, and on a CPU that multiplies bf16 natively
    (faster than fp32 there, benchmarks/RESULTS.md); fp32 elsewhere."""
    if dtype_name != "auto":
        return dtype_name
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return "bfloat16"
    return "float32"


def precision_note(device: torch.device, dtype_name: str) -> str | None:
    """A line for the one choice of `auto` a CPU user may not expect (bf16), else None."""
    if dtype_name == "auto" and device.type == "cpu" and resolve_dtype(device, dtype_name) == "bfloat16":
        return "precision: bf16 autocast (train.dtype auto: this CPU multiplies bf16 natively; " \
               "--train.dtype float32 for fp32)"
    return None


def autocast_for(device: torch.device, dtype_name: str):
    """The autocast context for train.dtype (see `resolve_dtype`); fp32 is no autocast at all."""
    dtype_name = resolve_dtype(device, dtype_name)
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))
