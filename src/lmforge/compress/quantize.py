"""`lmforge quantize`: int8 / int4 (round-to-nearest or GPTQ) / w8a8 models.

- int8: symmetric per output channel, round-to-nearest.
- int4: asymmetric groups of `group_size` inputs, round-to-nearest.
- gptq: int4 in the same format, each column rounded in turn and its error spread over
  the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs on
  calibration data (Frantar et al., 2022). Blocks are quantized in order and each block
  sees the outputs of the already-quantized blocks before it.
- w8a8: int8 weights (as int8) run with dynamically quantized int8 activations (fbgemm).

Every matmul is quantized: attention qkv/proj, MLP up/down and lm_head. A tied input
embedding becomes the dequantized lm_head (stored once, as codes).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from lmforge.compress.calibration import InputStats, blocks_with_inputs, calibration_tokens, replay
from lmforge.compress.qlinear import (
    CHUNK, DynamicInt8Linear, QuantizedLinear, abs_max, check_group_size, int4_codes, int4_grid, pack_int4,
)
from lmforge.compress import ecosystem
from lmforge.compress.storage import (
    FORMAT, LAYOUTS, LINEARS, linear_names, quantization_config, set_module, tie_embedding,
)
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

METHODS = ("int8", "int4", "gptq", "w8a8")
GROUP_SIZES = (128, 64, 32)  # int4 group sizes tried, largest first, when none is asked for


def check_method(method: str) -> None:
    if method not in METHODS:
        raise LmforgeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def choose_layout(model: Transformer, method: str, requested: str | None, log=lambda s: None) -> str:
    """compressed-tensors (what transformers and vLLM read) wherever it can hold the model; lmforge's
    own layout where it cannot (w8a8, GPT-2's Conv1D), or when asked for."""
    if requested is not None and requested not in LAYOUTS:
        raise LmforgeError(f"--format {requested!r} is not one of {', '.join(LAYOUTS)}")
    reason = ecosystem.unsupported_reason(model.config, method)
    if requested == ecosystem.QUANT_METHOD and reason:
        raise LmforgeError(f"--format {ecosystem.QUANT_METHOD} cannot hold this model: {reason}; "
                           "use --format lmforge (lmforge reads it, other loaders refuse it)")
    if requested is None and reason:
        log(f"stored in lmforge's own layout, which only lmforge reads: {reason}")
        return "lmforge"
    return requested or ecosystem.QUANT_METHOD


def check_quantizable(model: Transformer, method: str, group_size: int) -> None:
    check_method(method)
    if quantization_config(model) is not None:
        q = quantization_config(model)
        raise LmforgeError(f"the model is already quantized ({q.get('method')}); quantize the original fp32 model")
    for name in linear_names(model):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise LmforgeError(f"{name} is a {type(layer).__name__}, not a plain Linear; merge adapters first")
        if method in ("int4", "gptq"):
            check_group_size(layer.in_features, group_size, name)
        elif layer.in_features % CHUNK:
            raise LmforgeError(f"{name} has {layer.in_features} inputs; the int8 kernels need a multiple of {CHUNK}")


def fitting_group_size(model: Transformer, candidates=GROUP_SIZES) -> int | None:
    """The largest int4 group size that divides every layer's inputs (None if none does)."""
    widths = [model.get_submodule(n).in_features for n in linear_names(model)]
    return next((g for g in candidates if all(w % g == 0 for w in widths)), None)


def choose_group_size(model: Transformer, method: str, requested: int | None, log=lambda s: None) -> int | None:
    """The group size int4/gptq will use (None for the per-channel methods).

    A requested size is used as given (one that does not fit is an error, from
    `check_quantizable`). Without one, the largest of 128/64/32 that divides every layer's
    inputs: one size for the whole model, as the stored format records one. None of them
    fits only when some layer's width is not a multiple of 32, which no int4 kernel takes."""
    if method not in ("int4", "gptq"):
        return requested
    if requested is not None:
        return requested
    group = fitting_group_size(model)
    if group is None:
        widths = {n: model.get_submodule(n).in_features for n in linear_names(model)}
        name, width = next((n, w) for n, w in widths.items() if w % CHUNK)
        raise LmforgeError(f"{name} has {width} inputs, not a multiple of {CHUNK}: int4 cannot quantize this "
                           "model; use --method int8 or w8a8 (or a model whose widths are multiples of 32)")
    if group != GROUP_SIZES[0]:
        log(f"int4 groups of {group} inputs: the default {GROUP_SIZES[0]} does not divide every layer's inputs")
    return group


def symmetric_int4_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric int4 per group: zero fixed at 8, so W = scale * (q - 8) with q - 8 in
    -8..7, the grid compressed-tensors stores without zero points (transformers cannot load its packed
    zero points). The largest magnitude maps to 7.5 steps: every weight within half a step."""
    N, K = w.shape
    amax = abs_max(w.detach().float().reshape(N, K // group_size, group_size), -1)
    scale = (amax / 7.5).clamp(min=1e-10)
    return scale, torch.full_like(scale, 8, dtype=torch.uint8)


def int4_grid_for(symmetric: bool):
    return symmetric_int4_grid if symmetric else int4_grid


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01, symmetric: bool = False):
    """GPTQ for one layer: (packed codes, scales, zeros) in the int4 format of `QuantizedLinear`."""
    W = w.detach().double().clone()
    N, K = W.shape
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # not positive definite even after damping: fall back to round-to-nearest
        Hinv = torch.eye(K, dtype=H.dtype)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, K // group_size)
    zeros = torch.zeros(N, K // group_size, dtype=torch.uint8)
    for g0 in range(0, K, group_size):  # one block of columns = one quantization group
        g1 = g0 + group_size
        W1, Hinv1 = W[:, g0:g1].clone(), Hinv[g0:g1, g0:g1]
        scale, zero = int4_grid_for(symmetric)(W1.float(), group_size)
        scales[:, g0 // group_size], zeros[:, g0 // group_size] = scale[:, 0], zero[:, 0]
        s, z = scale[:, 0].double(), zero[:, 0].double()
        errors = torch.zeros_like(W1)
        for i in range(group_size):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s) + z, 0, 15)
            codes[:, g0 + i] = q.to(torch.uint8)
            err = (col - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = err
        W[:, g1:] -= errors @ Hinv[g0:g1, g1:]
    return pack_int4(codes), scales, zeros


def quantize_layer(linear: nn.Linear, method: str, group_size: int, hessian: torch.Tensor | None = None,
                   symmetric: bool = False) -> nn.Module:
    if method == "w8a8":
        return DynamicInt8Linear.from_float(linear)
    if method == "int8":
        return QuantizedLinear.from_float(linear, 8)
    if method == "gptq":
        codes = gptq_codes(linear.weight, hessian, group_size, symmetric=symmetric)
    else:
        check_group_size(linear.in_features, group_size)
        scale, zero = int4_grid_for(symmetric)(linear.weight, group_size)
        codes = (pack_int4(int4_codes(linear.weight, scale, zero, group_size)), scale, zero)
    return QuantizedLinear.from_float(linear, 4, group_size, codes)


@torch.no_grad()
def quantize_model(model: Transformer, method: str, group_size: int = 128, calibration: torch.Tensor | None = None,
                   log=lambda s: None, layout: str = "lmforge") -> Transformer:
    """Replace every linear of `model` (in place) with its quantized counterpart. int4 and gptq use a
    symmetric grid in the compressed-tensors layout (see `symmetric_int4_grid`), lmforge's asymmetric one
    otherwise."""
    check_quantizable(model, method, group_size)
    symmetric = layout == ecosystem.QUANT_METHOD
    model.eval()
    if method == "gptq":
        if calibration is None:
            raise LmforgeError("gptq needs calibration sequences (--data)")
        for layer, inputs in blocks_with_inputs(model, calibration):
            names = [f"blocks.{layer}.{p}" for p in LINEARS] if layer < len(model.blocks) else ["lm_head"]
            stats = InputStats(model, names, gram=True)
            if layer < len(model.blocks):
                replay(model, layer, inputs)
            else:
                for x in inputs:
                    model.lm_head(x)
            stats.close()
            for name in names:
                hessian = stats.gram[name] / stats.count[name]
                set_module(model, name, quantize_layer(model.get_submodule(name), method, group_size, hessian, symmetric))
            log(f"gptq: {'block ' + str(layer) if layer < len(model.blocks) else 'lm_head'} done")
    else:
        for name in linear_names(model):
            set_module(model, name, quantize_layer(model.get_submodule(name), method, group_size, symmetric=symmetric))
    if model.config.tie_embeddings:
        tie_embedding(model)
    bits = 8 if method in ("int8", "w8a8") else 4
    stored = "int4" if method == "gptq" else method
    model.quantization = {"quant_method": "lmforge", "format": FORMAT, "method": stored, "bits": bits,
                          "group_size": group_size if bits == 4 else None, "symmetric": bits == 8 or symmetric,
                          "algorithm": {"gptq": "gptq", "w8a8": "dynamic"}.get(method, "rtn"), "layout": layout}
    return model


def run_quantize(model_dir, method: str, out, group_size: int | None = None, data=None, samples: int = 256,
                 seq_len: int | None = None, seed: int = 0, log=print, layout: str | None = None) -> dict[str, Any]:
    import lmforge
    from lmforge.native import kernels
    from lmforge.compress.storage import check_out, is_quantized_dir, stored_weight_bytes
    from lmforge.model_dir import save_model_dir

    check_out(model_dir, out)
    q = is_quantized_dir(model_dir)
    if q is not None:
        raise LmforgeError(f"{model_dir} is already quantized ({q.get('method')}); quantize the original fp32 model")
    m = lmforge.load(model_dir)
    check_method(method)
    group_size = choose_group_size(m.model, method, group_size, log)
    stored_group = group_size or GROUP_SIZES[0]  # ignored by the per-channel methods
    check_quantizable(m.model, method, stored_group)
    layout = choose_layout(m.model, method, layout, log)
    calibration = None
    if method == "gptq":
        T = min(seq_len or 512, m.config.context)
        calibration = calibration_tokens(data, m.tokenizer, m.config.vocab, samples, T, seed)
        log(f"calibration: {len(calibration)} sequences of {T} tokens")
    start = time.perf_counter()
    quantize_model(m.model, method, stored_group, calibration, log=log, layout=layout)
    seconds = time.perf_counter() - start
    provenance = {"parents": [str(model_dir)], "quantized_in_s": round(seconds, 1)}
    if calibration is not None:
        provenance["calibration"] = {"data": str(data), "sequences": len(calibration), "tokens": calibration.shape[1]}
    save_model_dir(m.model, m.tokenizer, out, provenance)
    before, after = stored_weight_bytes(m.path), stored_weight_bytes(out)
    if method != "w8a8" and kernels() is None:
        log("note: the native kernels could not be built here (no C compiler?); this model runs through "
            "dequantize-then-matmul, which is correct but not faster")
    return {"method": method, "group_size": group_size, "seconds": seconds, "bytes_before": before,
            "bytes_after": after, "out": str(out), "layout": layout}
