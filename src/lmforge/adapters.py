"""LoRA adapters in the Hugging Face PEFT layout: which modules a model offers, and adapter files.

The layer arithmetic is `lmforge.model.lora`'s; this module knows the names. Our linears fuse
what Hugging Face keeps apart (`attn.qkv` is q_proj/k_proj/v_proj, `mlp.up` is
gate_proj/up_proj), so the adapter saves as PEFT's per-module tensors
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...) and PEFT loads it onto
the `transformers` model with the same logits; PEFT adapters load here the same way. Which
Hugging Face module makes which rows of which of our linears comes from the per-family weight
maps in `lmforge.interop.families`, the same rules that import and export weights.

    adapter/
      adapter_config.json        PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
      adapter_model.safetensors  lora_A / lora_B per targeted Hugging Face module
      lmforge.json               the base model it was trained on (config and weight sha256), for checks
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.atomic import atomic_directory
from lmforge.errors import LmforgeError
from lmforge.interop.hf import to_hf_config, weight_map
from lmforge.interop.weights import SafetensorsFiles
from lmforge.loaded import LoadedModel
from lmforge.model.lora import BLOCK_LINEARS, LoraSettings, Slice, add_lora, lora_layers, merge_lora
from lmforge.model_files import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- name maps

def hf_slices(model: nn.Module) -> list[Slice]:
    """Every Hugging Face module that makes rows of one of the model's block linears."""
    out = []
    for rule in weight_map(model.config):
        linear = rule.ours.removesuffix(".weight")
        if not rule.ours.endswith(".weight") or not linear.startswith("blocks.") \
                or linear.split(".", 2)[2] not in BLOCK_LINEARS:
            continue
        modules = [t.removesuffix(".weight") for t in rule.theirs]
        sizes = rule.sizes if rule.kind == "concat" else (model.get_submodule(linear).out_features,)
        start = 0
        for module, size in zip(modules, sizes):
            out.append(Slice(module, linear, start, size, rule.kind == "transpose"))
            start += size
    return out


def target_names(model: nn.Module) -> list[str]:
    """The short names a LoRA target may take for this model's family, in order."""
    return list(dict.fromkeys(s.short_name for s in hf_slices(model)))


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    valid = target_names(model)
    if targets == "all-linear":
        return valid
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise LmforgeError(f"LoRA target {unknown[0] if unknown else '(none)'!r} is not a module of this "
                           f"{model.config.family} model; choose among {', '.join(valid)} or all-linear")
    return [t for t in valid if t in targets]


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `model` and add fresh adapters on the modules `settings.targets` names (in place).
    Only the adapters' parameters require gradients afterwards."""
    targets = set(resolve_targets(model, settings.targets))
    add_lora(model, [s for s in hf_slices(model) if s.short_name in targets],
             settings.r, settings.alpha, settings.dropout)
    return model


# ----------------------------------------------------------------------------- save

def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT tensor name: tensor}: lora_A (r, in) and lora_B (rows, r) per Hugging Face module."""
    out = {}
    for layer in lora_layers(model).values():
        for i, s in enumerate(layer.slices):
            name = PEFT_PREFIX + s.hf_module
            out[f"{name}.lora_A.weight"] = layer.lora_A[i * layer.r:(i + 1) * layer.r].detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = layer.lora_B[i].detach().float().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, base: str, task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    layers = list(lora_layers(model).values())
    if not layers:
        raise LmforgeError("the model carries no LoRA adapter to save")
    first = layers[0]
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p,
        "target_modules": sorted({s.short_name for layer in layers for s in layer.slices}),
        "fan_in_fan_out": any(s.fan_in_fan_out for layer in layers for s in layer.slices),
        "bias": "none", "use_rslora": first.use_rslora, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def base_fingerprint(model: nn.Module, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What identifies a base model: its Hugging Face config and the sha256 of its weight files."""
    config = {k: v for k, v in to_hf_config(model.config).items() if k != "torch_dtype"}
    return {"config": config, "weights": (meta or {}).get("weights")}


def save_adapter(model: nn.Module, out: str | Path, base: str, base_meta: dict[str, Any] | None = None,
                 extra: dict[str, torch.Tensor] | None = None, provenance: dict[str, Any] | None = None,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapter directory (atomically). `extra` tensors (a task head) go to head.safetensors."""
    config = adapter_config(model, base, task_type)
    with atomic_directory(out) as d:
        (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(adapter_tensors(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(d / "head.safetensors"))
        record = {"base": {"path": base, **base_fingerprint(model, base_meta)}, **(provenance or {})}
        (d / "lmforge.json").write_text(json.dumps(record, indent=2, default=str))
    return Path(out)


# ----------------------------------------------------------------------------- load

def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_config, tensors, lmforge record or {}) of an adapter directory, validated."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise LmforgeError(f"{folder} is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    config = read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise LmforgeError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if config.get(key, ok) not in (ok, None):
            raise LmforgeError(f"{folder}: {key}={config[key]!r} is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LmforgeError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise LmforgeError(f"{folder}/{ADAPTER_CONFIG}: r must be a positive integer")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LmforgeError(f"{folder} has no {ADAPTER_WEIGHTS} (lmforge reads safetensors adapters only)")
    source = SafetensorsFiles([weights])
    tensors = {name: source.read(name) for name in source.names()}
    source.close()
    record = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return config, tensors, record


def check_base(model: nn.Module, meta: dict[str, Any] | None, record: dict[str, Any], adapter: str) -> None:
    """An adapter trained on another base model is an error, not silently wrong outputs."""
    recorded = record.get("base")
    if not recorded:
        return  # a PEFT adapter from elsewhere: the tensor names and shapes are checked instead
    ours = base_fingerprint(model, meta)
    theirs_cfg, ours_cfg = recorded.get("config") or {}, ours["config"]
    diff = [k for k in sorted(set(theirs_cfg) | set(ours_cfg)) if theirs_cfg.get(k) != ours_cfg.get(k)
            and k not in ("bos_token_id", "eos_token_id", "pad_token_id")]
    if diff:
        k = diff[0]
        raise LmforgeError(f"adapter {adapter} was trained on a different base model ({recorded.get('path')}): "
                           f"its {k} is {theirs_cfg.get(k)!r}, this model's is {ours_cfg.get(k)!r}")
    if recorded.get("weights") and ours["weights"] and recorded["weights"] != ours["weights"]:
        raise LmforgeError(f"adapter {adapter} was trained on {recorded.get('path')}, whose weights differ from this "
                           "model's (sha256 in lmforge.json); load it onto that base model (or pass check_base=False)")


def _lora_pairs(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{Hugging Face module: {"lora_A": A, "lora_B": B}} from PEFT's tensor names (with or without
    the adapter name `default`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem = name.removeprefix(PEFT_PREFIX)
        for kind in ("lora_A", "lora_B"):
            for suffix in (f".{kind}.weight", f".{kind}.default.weight"):
                if stem.endswith(suffix):
                    pairs.setdefault(stem.removesuffix(suffix), {})[kind] = tensor
                    break
            else:
                continue
            break
        else:
            raise LmforgeError(f"adapter {path}: tensor {name!r} is not a LoRA A/B matrix (modules_to_save and "
                               "embedding adapters are not supported)")
    return pairs


def adapter_matrices(loaded: LoadedModel, path: str | Path, check: bool = True
                     ) -> tuple[dict[str, Any], list[Slice], dict[str, dict[str, torch.Tensor]]]:
    """The adapter at `path` checked against `loaded`'s model: (its adapter_config, the slices
    it updates, {Hugging Face module: {"lora_A": A, "lora_B": B}}). LmforgeError, in one line,
    for an adapter that does not fit the model."""
    model = loaded.model
    config, tensors, record = read_adapter(path)
    if check:
        check_base(model, loaded.meta, record, str(path))
    pairs = _lora_pairs(tensors, path)
    r = config["r"]
    by_module = {s.hf_module: s for s in hf_slices(model)}
    slices = []
    for module, ab in pairs.items():
        s = by_module.get(module)
        if s is None:
            raise LmforgeError(f"adapter {path} targets {module}, which this {model.config.family} model does not "
                               "have: it was made for another base model")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LmforgeError(f"adapter {path}: {module} lacks its {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        in_f = model.get_submodule(s.linear).in_features
        if tuple(ab["lora_A"].shape) != (r, in_f) or tuple(ab["lora_B"].shape) != (s.size, r):
            raise LmforgeError(f"adapter {path}: {module} has A {tuple(ab['lora_A'].shape)}, B "
                               f"{tuple(ab['lora_B'].shape)}; this model needs A ({r}, {in_f}), B ({s.size}, {r}): "
                               "the adapter belongs to a different base model")
        slices.append(s)
    if not slices:
        raise LmforgeError(f"adapter {path} holds no LoRA weights")
    return config, slices, pairs


def apply_adapter(loaded: LoadedModel, path: str | Path, merge: bool = False, check: bool = True) -> LoadedModel:
    """Put the LoRA adapter at `path` (ours or one saved by PEFT) onto a `lmforge.load()`ed model,
    in place; `merge` folds it into the weights. Returns the same LoadedModel."""
    model = loaded.model
    config, slices, pairs = adapter_matrices(loaded, path, check)
    r = config["r"]
    layers = add_lora(model, slices, r, float(config.get("lora_alpha", 8)), 0.0, bool(config.get("use_rslora")))
    with torch.no_grad():
        for layer in layers.values():
            for i, s in enumerate(layer.slices):
                layer.lora_A[i * r:(i + 1) * r].copy_(pairs[s.hf_module]["lora_A"])
                layer.lora_B[i].copy_(pairs[s.hf_module]["lora_B"])
    if merge:
        merge_lora(model)
    loaded.meta = {**loaded.meta, "adapter": str(path)}
    return loaded
