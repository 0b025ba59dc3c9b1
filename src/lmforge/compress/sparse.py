"""Pruned weights stored compactly: 2:4 as half the values plus 2-bit indices, very sparse
layers as a bitmap plus the nonzero values.

- 2:4 (`lmforge prune --pattern 2:4`): of every group of 4 inputs of a row at most 2 are
  nonzero. Stored as `<name>.values` (N, K/2) in the model's dtype (the 2 kept weights of each
  group, in input order) and `<name>.indices` (N, ceil(K/8)) uint8: each group's two positions
  (0..3, the first below the second) in one nibble, first in bits 0-1, second in bits 2-3,
  group 2j in the low nibble of byte j and 2j+1 in the high one. A group with fewer than 2
  nonzeros keeps zeros at unused positions, so any 2:4-valid matrix round-trips exactly.
- bitmap (layers at least BITMAP_MIN_SPARSITY sparse, any pattern): `<name>.bitmap`
  (N, ceil(K/8)) uint8, bit k%8 of byte k//8 set where input k is nonzero, and `<name>.values`
  the nonzeros row by row. At fp32 a bitmap costs 1/32 of the dense matrix, CSR's int16 column
  indices half of each kept value: the bitmap is smaller at every sparsity above ~6%.

Every other tensor is stored under lmforge's module name (`blocks.0.norm1.weight`). config.json
names the model type `lmforge_sparse` (the family in `lmforge_model_type`) and carries a
`sparsity_config`: transformers refuses an unknown model type with an error, where it would load
unknown tensor names as random weights. `lmforge.load` expands every layer to dense (training
and PyTorch run dense matrices); `lmforge export --format hf` therefore writes a dense directory.
The loaded 2:4 layers are marked (`SPARSE_ATTR`) so the native decoder packs them again for its
2:4 kernel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.compress.sparse_format import (BITMAP_MIN_SPARSITY, SPARSE_ATTR, is_two_four, pack_bitmap,
                                             pack_two_four, unpack_bitmap, unpack_two_four)
from lmforge.compress.storage import LINEARS
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import from_hf_config
from lmforge.model import Transformer
from lmforge.model_files import WEIGHTS, load_tokenizer, read_json, sha256_file, weight_files

FORMAT = 1
SPARSE_MODEL_TYPE = "lmforge_sparse"  # no other loader knows it, so none loads our tensors as random weights


def _sparse_linears(model: Transformer) -> list[str]:
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in LINEARS]


def compact_tensors(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor to store ({name: tensor}) and each compacted layer's format ({layer: "2:4" | "bitmap"})."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as tok_emb.weight; tied again when loading
    formats: dict[str, str] = {}
    for name in _sparse_linears(model):
        w = state[f"{name}.weight"]
        if is_two_four(w):
            values, indices = pack_two_four(w, name)
            state[f"{name}.values"], state[f"{name}.indices"] = values, indices
            formats[name] = "2:4"
        elif float((w == 0).float().mean()) >= BITMAP_MIN_SPARSITY:
            state[f"{name}.values"], state[f"{name}.bitmap"] = pack_bitmap(w)
            formats[name] = "bitmap"
        else:
            continue
        del state[f"{name}.weight"]
    return state, formats


def sparse_hf_config(hf_config: dict[str, Any], formats: dict[str, str]) -> dict[str, Any]:
    counts = {f: sum(v == f for v in formats.values()) for f in ("2:4", "bitmap")}
    return {**hf_config, "architectures": ["LmforgeSparseForCausalLM"], "model_type": SPARSE_MODEL_TYPE,
            "lmforge_model_type": hf_config["model_type"],
            "sparsity_config": {"format": FORMAT, "layers": formats, "counts": counts}}


def write_sparse_weights(d: Path, model: Transformer, hf_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The compact safetensors file in `d`; returns (config.json's content, {file: sha256})."""
    state, formats = compact_tensors(model)
    config = sparse_hf_config(hf_config, formats)
    save_file(state, str(d / WEIGHTS), metadata={"format": "pt", "lmforge_sparse": json.dumps(config["sparsity_config"])})
    return config, {WEIGHTS: sha256_file(d / WEIGHTS)}


def load_sparse(folder: Path, hf_config: dict[str, Any], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None,
                key: bytes | None = None) -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    """A compact directory (sealed: given its key) loaded as a dense model (its 2:4 layers marked
    for the native decoder)."""
    from lmforge.compress.storage import read_sealed_tensors, read_tensors
    from lmforge.interop.crypto import ENCRYPTION_FILE

    scfg = hf_config["sparsity_config"]
    if not isinstance(scfg, dict) or scfg.get("format") != FORMAT or not isinstance(scfg.get("layers"), dict):
        raise LmforgeError(f"{folder}: sparsity_config in config.json is not lmforge's format {FORMAT}; "
                           "re-create the directory with lmforge prune")
    plain = {k: v for k, v in hf_config.items() if k != "sparsity_config"}
    plain["model_type"] = plain.get("lmforge_model_type")
    cfg: ModelConfig = from_hf_config(plain)
    sealed = (folder / ENCRYPTION_FILE).is_file()
    tensors = read_sealed_tensors(folder, key) if sealed else read_tensors(weight_files(folder))
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, fmt in scfg["layers"].items():
        if f"{name}.weight" not in shapes or fmt not in ("2:4", "bitmap"):
            raise LmforgeError(f"{folder}: sparsity_config names layer {name!r} as {fmt!r}, which this model "
                               "does not have; re-create the directory with lmforge prune")
        extra = "indices" if fmt == "2:4" else "bitmap"
        try:
            values, index = tensors.pop(f"{name}.values"), tensors.pop(f"{name}.{extra}")
        except KeyError:
            raise LmforgeError(f"{folder}: layer {name} is declared {fmt} but its tensors are missing; "
                               "re-create the directory with lmforge prune") from None
        K = shapes[f"{name}.weight"][1]
        unpack = unpack_two_four if fmt == "2:4" else unpack_bitmap
        tensors[f"{name}.weight"] = unpack(values, index, K, f"{folder}: {name}")
    expected = set(shapes) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise LmforgeError(f"{folder}: the weights do not match config.json (missing {missing[:1]}, unexpected "
                           f"{extra[:1]}); re-create the directory with lmforge prune")
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise LmforgeError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, config.json implies {shapes[name]}")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, assign=True, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.init_rope()
    for name, fmt in scfg["layers"].items():
        if fmt == "2:4":
            setattr(model.get_submodule(name), SPARSE_ATTR, "2:4")
    model = model.to(device).eval()
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return model, load_tokenizer(folder), meta


def mark_two_four(model: nn.Module) -> None:
    """Mark the block linears whose weights are 2:4 (for the native decoder's 2:4 kernel)."""
    for name in _sparse_linears(model):
        layer = model.get_submodule(name)
        if is_two_four(layer.weight.detach()):
            setattr(layer, SPARSE_ATTR, "2:4")
