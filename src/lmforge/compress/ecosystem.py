"""lmforge's int8 / int4 layers in the compressed-tensors layout, which transformers and vLLM read.

compressed-tensors (the `compressed-tensors` package; `quant_method: "compressed-tensors"`,
format `pack-quantized`) stores each quantized Linear under its Hugging Face name as

    <name>.weight_packed      int32 (N, K * bits / 32): codes in signed form (q - 2^(bits-1)),
                              32/bits per word, the first in the lowest bits
    <name>.weight_scale       (N, K / group) for int4 groups, (N, 1) for int8 channels
    <name>.weight_shape       int64 [N, K]
    <name>.weight_zero_point  asymmetric schemes only: zero points packed down the rows

and dequantizes W = (q - zero) * scale, the arithmetic of `QuantizedLinear`. lmforge writes
symmetric schemes (int8 per channel; int4 in groups with zero 8, see
`quantize.symmetric_int4_grid`), because transformers' loader cannot read packed zero points
yet; it reads asymmetric ones too. The conversion is exact both ways: codes 0..15 become -8..7,
int8 codes stay as they are. Fused layers (qkv, gate/up) are split by rows with the family's
weight map; every row is quantized on its own, so a split is exact too.

The lm_head stays quantized (lmforge quantizes every matmul). A tied input embedding is
written as the dequantized lm_head in fp32 and the config is written untied, as transformers
cannot tie an embedding to a packed layer; lmforge.json remembers the tie so lmforge restores it.

What compressed-tensors cannot describe stays in lmforge's own layout (`storage.py`):
GPT-2's Conv1D layers (transformers' compressed-tensors support targets nn.Linear) and
w8a8, whose activations are quantized per tensor by fbgemm.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmforge.compress.qlinear import CHUNK, DynamicInt8Linear, QuantizedLinear, pack_int4, row_blocks, unpack_int4
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule
from lmforge.interop.hf import split_rule, weight_map
from lmforge.model import Transformer

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"


def unsupported_reason(cfg: ModelConfig, method: str) -> str | None:
    """Why this model cannot be written as compressed-tensors (None: it can)."""
    if method == "w8a8":
        return "w8a8's activations are quantized per tensor by fbgemm, which compressed-tensors does not describe"
    if any(rule.kind == "transpose" for rule in untied_rules(cfg)):
        return f"{cfg.family} stores its layers as Conv1D, which compressed-tensors does not quantize"
    return None


def untied_rules(cfg: ModelConfig) -> list[Rule]:
    """The weight map with an lm_head of its own: the quantized lm_head is written even when tied."""
    return weight_map(cfg.model_copy(update={"tie_embeddings": False}))


def quantization_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's `quantization_config` for lmforge's `qcfg` (method int8 or int4, symmetric)."""
    bits = qcfg["bits"]
    if not qcfg.get("symmetric"):
        raise LmforgeError("compressed-tensors is written for symmetric grids only (transformers cannot load "
                           "packed zero points); quantize with --format compressed-tensors")
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if bits == 4 else "channel", "group_size": qcfg["group_size"] if bits == 4 else None,
               "observer": "minmax", "observer_kwargs": {}, "actorder": None, "block_structure": None}
    return {"quant_method": QUANT_METHOD, "format": PACKED, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}},
            "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}


# ----------------------------------------------------------------------------- packing

def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) -> int32 words (rows, ceil(cols * bits / 32)), value i of a word at bit i * bits.

    Block by block of rows: the int64 arithmetic would otherwise take 8 bytes per code at once."""
    per = 32 // bits
    rows, cols = values.shape
    shifts = torch.arange(per, dtype=torch.int64) * bits
    out = torch.empty(rows, -(-cols // per), dtype=torch.int32)
    for block in row_blocks(rows, cols):
        unsigned = values[block].to(torch.int64) + (1 << (bits - 1))
        unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per)).reshape(unsigned.shape[0], -1, per)
        words = (unsigned << shifts).sum(-1)
        out[block] = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return out


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack_int32`: signed codes (rows, cols) as int8, block by block of rows."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    out = torch.empty(words.shape[0], cols, dtype=torch.int8)
    for block in row_blocks(words.shape[0], words.shape[1] * per):
        unsigned = (words[block].to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts
        unsigned = (unsigned & ((1 << bits) - 1)).reshape(unsigned.shape[0], -1)[:, :cols]
        out[block] = unsigned - (1 << (bits - 1))
    return out


# ----------------------------------------------------------------------------- write

def layer_tensors(layer: QuantizedLinear) -> list[tuple[str, torch.Tensor]]:
    """(suffix, tensor) of one layer as full matrices: signed codes (N, K) and scales."""
    if layer.bits == 8:
        return [("codes", layer.qweight), ("weight_scale", layer.scales[:, None].float())]
    if bool((layer.zeros != 8).any()):
        raise LmforgeError("an int4 layer with zero points other than 8 (an asymmetric grid) cannot be written "
                           "as symmetric compressed-tensors")
    return [("codes", unpack_int4(layer.qweight).view(torch.int8).sub_(8)), ("weight_scale", layer.scales.float())]


def packed(parts: dict[str, torch.Tensor], bits: int, in_features: int) -> dict[str, torch.Tensor]:
    out = {"weight_packed": pack_int32(parts["codes"], bits), "weight_scale": parts["weight_scale"].contiguous(),
           "weight_shape": torch.tensor([parts["codes"].shape[0], in_features], dtype=torch.int64)}
    return out


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized model under its Hugging Face name, quantized layers packed."""
    cfg = model.config
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for rule in untied_rules(cfg):
        module = rule.ours.rpartition(".")[0]
        layer = model.get_submodule(module) if rule.ours.endswith(".weight") else None
        if isinstance(layer, QuantizedLinear):
            for theirs, rows in split_rows(rule, layer_tensors(layer)).items():
                prefix = theirs.removesuffix(".weight")
                out.update({f"{prefix}.{k}": v for k, v in packed(rows, layer.bits, layer.in_features).items()})
        elif isinstance(layer, DynamicInt8Linear):
            raise LmforgeError(unsupported_reason(cfg, "w8a8"))
        else:
            out.update({k: v.detach().float().contiguous() for k, v in split_rule(rule, state[rule.ours]).items()})
    return out


def split_rows(rule: Rule, parts) -> dict[str, Any]:
    """{their name: {suffix: rows}} for a fused layer (rows split as the family's rule says), one entry otherwise."""
    if rule.kind == "transpose":
        raise LmforgeError(f"{rule.ours} is stored transposed; compressed-tensors cannot hold it")
    sizes = list(rule.sizes) if rule.kind == "concat" else None
    out: dict[str, Any] = {name: {} for name in rule.theirs}
    for suffix, tensor in parts:
        pieces = tensor.split(sizes) if sizes else (tensor,)
        for name, piece in zip(rule.theirs, pieces):
            out[name][suffix] = piece
    if parts and parts[0][0] == "t":
        return {name: d["t"] for name, d in out.items()}
    return out


# ----------------------------------------------------------------------------- read

def scheme(qconfig: dict[str, Any]) -> dict[str, Any]:
    """The one weight scheme lmforge reads: int8 per channel (symmetric) or int4 in groups, weights only."""
    groups = qconfig.get("config_groups") or {}
    if qconfig.get("format") != PACKED or len(groups) != 1:
        raise LmforgeError(f"compressed-tensors format {qconfig.get('format')!r} with {len(groups)} scheme group(s): "
                           f"lmforge reads {PACKED} with one int8 or int4 weight scheme")
    group = next(iter(groups.values()))
    w = group.get("weights") or {}
    if group.get("input_activations") or w.get("type") != "int" or w.get("dynamic"):
        raise LmforgeError("compressed-tensors scheme with quantized activations or non-integer weights: "
                           "lmforge reads weight-only int8/int4")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if not ((bits == 8 and strategy == "channel" and w.get("symmetric")) or (bits == 4 and strategy == "group")):
        raise LmforgeError(f"compressed-tensors {bits}-bit {strategy} weights: lmforge reads int8 per channel "
                           "(symmetric) and int4 in groups")
    group_size = w.get("group_size") if bits == 4 else None
    if bits == 4 and (not isinstance(group_size, int) or group_size <= 0 or group_size % CHUNK):
        raise LmforgeError(f"compressed-tensors int4 group size {group_size!r}: lmforge needs a multiple of {CHUNK}")
    if group.get("targets") != ["Linear"]:
        raise LmforgeError(f"compressed-tensors targets {group.get('targets')}: lmforge reads schemes on every Linear")
    return {"bits": bits, "group_size": group_size, "symmetric": bool(w.get("symmetric"))}


def ignored_modules(qconfig: dict[str, Any], names: list[str]) -> set[str]:
    """The Hugging Face module names (of `names`) that the config leaves unquantized."""
    patterns = qconfig.get("ignore") or []
    out = set()
    for name in names:
        for p in patterns:
            if name == p or (p.startswith("re:") and re.fullmatch(p[3:], name)):
                out.add(name)
    return out


def lmforge_layer(tensors: dict[str, torch.Tensor], prefix: str, s: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """One compressed-tensors layer as signed codes, scales and zeros (lmforge's ranges: zeros 0..15)."""
    try:
        shape = tensors[f"{prefix}.weight_shape"].tolist()
        words, scale = tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"].float()
    except KeyError as e:
        raise LmforgeError(f"{where}: tensor {e.args[0]} is missing") from None
    rows, cols = int(shape[0]), int(shape[1])
    if words.dtype != torch.int32 or tuple(words.shape) != (rows, -(-cols * s["bits"] // 32)):
        raise LmforgeError(f"{where}: {prefix}.weight_packed has shape {tuple(words.shape)} ({words.dtype}), "
                           f"which does not hold a {rows}x{cols} {s['bits']}-bit matrix")
    codes = unpack_int32(words, s["bits"], cols)
    if s["bits"] == 8:
        return {"codes": codes, "scales": scale.reshape(rows)}
    groups = cols // s["group_size"]
    if cols % s["group_size"] or tuple(scale.shape) != (rows, groups):
        raise LmforgeError(f"{where}: {prefix}.weight_scale has shape {tuple(scale.shape)}, not ({rows}, {groups})")
    if s["symmetric"]:
        zeros = torch.zeros(rows, groups, dtype=torch.int16)
    else:
        zp = tensors.get(f"{prefix}.weight_zero_point")
        if zp is None:
            raise LmforgeError(f"{where}: tensor {prefix}.weight_zero_point is missing (asymmetric int4)")
        zeros = unpack_int32(zp.t().contiguous(), 4, rows).t()
    return {"codes": codes.add_(8), "scales": scale, "zeros": zeros + 8}


def lmforge_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, qconfig: dict[str, Any], linears: list[str],
                  where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], set[str]]:
    """(state dict in lmforge's names and buffers, lmforge's quantization dict, those of our `linears`
    the config leaves unquantized)."""
    s = scheme(qconfig)
    rules = untied_rules(cfg)
    tied_plain_head = cfg.tie_embeddings and "lm_head.weight_packed" not in tensors
    if tied_plain_head:  # a tied model whose lm_head was left unquantized: the embedding is both
        rules = weight_map(cfg)
    prefixes = [t.removesuffix(".weight") for r in rules for t in r.theirs if r.ours.endswith(".weight")]
    skipped = ignored_modules(qconfig, prefixes)
    state: dict[str, torch.Tensor] = {}
    plain: set[str] = set()
    for rule in rules:
        module = rule.ours.rpartition(".")[0]
        prefixes = [t.removesuffix(".weight") for t in rule.theirs]
        quantized = rule.ours.endswith(".weight") and f"{prefixes[0]}.weight_packed" in tensors
        if quantized and not skipped.intersection(prefixes):
            parts = [lmforge_layer(tensors, p, s, where) for p in prefixes]
            codes = torch.cat([p["codes"] for p in parts])
            if s["bits"] == 8:
                state[f"{module}.qweight"] = codes.to(torch.int8)
                state[f"{module}.scales"] = torch.cat([p["scales"] for p in parts])
            else:
                state[f"{module}.qweight"] = pack_int4(codes.to(torch.uint8))
                state[f"{module}.scales"] = torch.cat([p["scales"] for p in parts])
                state[f"{module}.zeros"] = torch.cat([p["zeros"] for p in parts]).to(torch.uint8)
            continue
        missing = [t for t in rule.theirs if t not in tensors]
        if missing:
            raise LmforgeError(f"{where}: tensor {missing[0]} is missing")
        state[rule.ours] = torch.cat([tensors[t].float() for t in rule.theirs]) if len(rule.theirs) > 1 \
            else tensors[rule.theirs[0]].float() + (1 if rule.kind == "plus_one" else 0)
        if rule.ours.endswith(".weight") and module in linears:
            plain.add(module)
    if tied_plain_head:
        state["lm_head.weight"] = state["tok_emb.weight"]
        plain.add("lm_head")
    qcfg = {"quant_method": "lmforge", "method": "int8" if s["bits"] == 8 else "int4", "bits": s["bits"],
            "group_size": s["group_size"], "symmetric": s["symmetric"], "algorithm": "rtn", "layout": QUANT_METHOD}
    return state, qcfg, plain
