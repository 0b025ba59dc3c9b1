"""LoRA: trainable low-rank updates on a frozen Transformer, saved in the Hugging Face PEFT layout.

A LoRA layer adds `scaling * B @ A` to a frozen weight W (A: (r, in), B: (out, r), B starts at
zero, so the adapted model starts out equal to the base). Our linears fuse what Hugging Face
keeps apart (`attn.qkv` is q_proj/k_proj/v_proj, `mlp.up` is gate_proj/up_proj), so one
`LoraLinear` holds one (A, B) pair per Hugging Face module it targets, each updating its own
rows of the fused output. The adapter therefore saves as PEFT's per-module tensors
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...) and PEFT loads it onto
the `transformers` model with the same logits; PEFT adapters load here the same way.

Which Hugging Face module makes which rows of which of our linears comes from the per-family
weight maps in `lmforge.interop.families`, the same rules that import and export weights.

    adapter/
      adapter_config.json        PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
      adapter_model.safetensors  lora_A / lora_B per targeted Hugging Face module
      lmforge.json               the base model it was trained on (config and weight sha256), for checks

The base may be a quantized `QuantizedLinear` (QLoRA): its weight is dequantized on the fly in
forward and again in backward, so only the int8/int4 codes stay in memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator

from lmforge.errors import LmforgeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


class LoraSettings(BaseModel):
    """r, alpha, dropout and target modules (Hugging Face short names, as PEFT spells them)."""

    model_config = ConfigDict(extra="forbid")

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"  # e.g. [q_proj, v_proj]; "all-linear": every block linear

    @field_validator("r")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("r must be positive")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        return v

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


# ----------------------------------------------------------------------------- name maps

@dataclass(frozen=True)
class Slice:
    """One Hugging Face module (`model.layers.0.self_attn.k_proj`) inside one of our linears:
    output rows start..start+size of `linear`."""

    hf_module: str
    linear: str
    start: int
    size: int
    fan_in_fan_out: bool  # GPT-2's Conv1D stores its weight transposed

    @property
    def short_name(self) -> str:
        return self.hf_module.rsplit(".", 1)[-1]


def hf_slices(model: nn.Module) -> list[Slice]:
    """Every Hugging Face module that makes rows of one of the model's block linears."""
    from lmforge.interop.hf import weight_map

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


# ----------------------------------------------------------------------------- the layer

class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T for a quantized W, dequantized in forward and again in backward: autograd keeps
    the int codes, never the full-precision weight (QLoRA's memory saving)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, dequantized_weight(layer).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ dequantized_weight(ctx.layer).to(grad.dtype), None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    from lmforge.compress.qlinear import dequantize_int4, dequantize_int8

    if layer.bits == 8:
        return dequantize_int8(layer.qweight, layer.scales)
    return dequantize_int4(layer.qweight, layer.scales, layer.zeros, layer.group_size)


def is_quantized(layer: nn.Module) -> bool:
    return hasattr(layer, "qweight")


class LoraLinear(nn.Module):
    """A frozen linear (`base`) plus one low-rank update per targeted slice of its output rows.

    The A matrices of all slices are stacked into one (n*r, in) matmul; each slice's B then
    writes its own rows. Rows no slice targets get no update.
    """

    def __init__(self, base: nn.Module, slices: list[Slice], r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.slices = list(slices)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.use_rslora = use_rslora
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.buffers() if is_quantized(base) else base.parameters())).device
        self.lora_A = nn.Parameter(torch.empty(len(slices) * r, self.in_features, device=device))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(s.size, r, device=device)) for s in slices)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear) initialize A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The output laid out as runs of (slice index or None for untouched rows, row count).
        layout, row = [], 0
        for i, s in sorted(enumerate(self.slices), key=lambda t: t[1].start):
            if s.start > row:
                layout.append((None, s.start - row))
            layout.append((i, s.size))
            row = s.start + s.size
        if row < self.out_features:
            layout.append((None, self.out_features - row))
        self.layout = layout

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_quantized(self.base) or not torch.is_grad_enabled():
            return self.base(x)
        y = _DequantizedMatmul.apply(x, self.base)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        h = self.dropout(x) @ self.lora_A.t().to(x.dtype)  # (..., n*r)
        parts = h.split(self.r, dim=-1)
        pieces = [parts[i] @ self.lora_B[i].t().to(h.dtype) if i is not None else h.new_zeros(*h.shape[:-1], n)
                  for i, n in self.layout]
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return y + delta * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, placed at each slice's rows: (out, in), fp32."""
        w = torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        for i, s in enumerate(self.slices):
            a = self.lora_A[i * self.r:(i + 1) * self.r].float()
            w[s.start:s.start + s.size] += self.lora_B[i].float() @ a
        return w * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing what this layer computes."""
        base = self.base
        weight = dequantized_weight(base) if is_quantized(base) else base.weight.float()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        out.weight.copy_(weight + self.delta_weight())
        if base.bias is not None:
            out.bias.copy_(base.bias.float())
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, slices=[{', '.join(s.short_name for s in self.slices)}]"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _wrap(model: nn.Module, by_linear: dict[str, list[Slice]], r: int, alpha: float, dropout: float,
          use_rslora: bool = False) -> None:
    if lora_layers(model):
        raise LmforgeError("the model already carries a LoRA adapter; merge it first (lmforge merge)")
    for p in model.parameters():
        p.requires_grad_(False)
    for linear, slices in by_linear.items():
        _set_module(model, linear, LoraLinear(model.get_submodule(linear), slices, r, alpha, dropout, use_rslora))


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `model` and add fresh adapters on the targeted modules (in place). Only the
    adapters' parameters require gradients afterwards."""
    targets = set(resolve_targets(model, settings.targets))
    by_linear: dict[str, list[Slice]] = {}
    for s in hf_slices(model):
        if s.short_name in targets:
            by_linear.setdefault(s.linear, []).append(s)
    _wrap(model, by_linear, settings.r, settings.alpha, settings.dropout)
    model.lora_targets = sorted(targets)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place): plain `nn.Linear`s again."""
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_targets"):
        del model.lora_targets
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once, quantized layers as in x out."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if is_quantized(m):
            total += m.in_features * m.out_features
    return trainable, total


# ----------------------------------------------------------------------------- save and load

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
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": _dropout_p(first),
        "target_modules": sorted({s.short_name for layer in layers for s in layer.slices}),
        "fan_in_fan_out": any(s.fan_in_fan_out for layer in layers for s in layer.slices),
        "bias": "none", "use_rslora": first.use_rslora, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def _dropout_p(layer: LoraLinear) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def base_fingerprint(model: nn.Module, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What identifies a base model: its Hugging Face config and the sha256 of its weight files."""
    from lmforge.interop.hf import to_hf_config

    config = {k: v for k, v in to_hf_config(model.config).items() if k != "torch_dtype"}
    return {"config": config, "weights": (meta or {}).get("weights")}


def save_adapter(model: nn.Module, out: str | Path, base: str, base_meta: dict[str, Any] | None = None,
                 extra: dict[str, torch.Tensor] | None = None, provenance: dict[str, Any] | None = None,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapter directory (atomically). `extra` tensors (a task head) go to head.safetensors."""
    from safetensors.torch import save_file

    from lmforge.model_dir import atomic_directory

    config = adapter_config(model, base, task_type)
    with atomic_directory(out) as d:
        (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(adapter_tensors(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(d / "head.safetensors"))
        record = {"base": {"path": base, **base_fingerprint(model, base_meta)}, **(provenance or {})}
        (d / "lmforge.json").write_text(json.dumps(record, indent=2, default=str))
    return Path(out)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_config, tensors, lmforge record or {}) of an adapter directory, validated."""
    from lmforge.interop.weights import SafetensorsFiles
    from lmforge.model_dir import read_json

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


def apply_adapter(loaded, path: str | Path, merge: bool = False, check: bool = True):
    """Put the LoRA adapter at `path` (ours or one saved by PEFT) onto a `lmforge.load()`ed model,
    in place; `merge` folds it into the weights. Returns the same LoadedModel."""
    model = loaded.model
    config, tensors, record = read_adapter(path)
    if check:
        check_base(model, loaded.meta, record, str(path))
    by_module = {s.hf_module: s for s in hf_slices(model)}
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
    r = config["r"]
    by_linear: dict[str, list[tuple[Slice, dict[str, torch.Tensor]]]] = {}
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
        by_linear.setdefault(s.linear, []).append((s, ab))
    if not by_linear:
        raise LmforgeError(f"adapter {path} holds no LoRA weights")
    _wrap(model, {k: [s for s, _ in v] for k, v in by_linear.items()}, r, float(config.get("lora_alpha", 8)),
          0.0, bool(config.get("use_rslora")))
    with torch.no_grad():
        for linear, items in by_linear.items():
            layer = model.get_submodule(linear)
            for i, (_, ab) in enumerate(items):
                layer.lora_A[i * r:(i + 1) * r].copy_(ab["lora_A"])
                layer.lora_B[i].copy_(ab["lora_B"])
    model.lora_targets = sorted({s.short_name for v in by_linear.values() for s, _ in v})
    if merge:
        merge_lora(model)
    loaded.meta = {**loaded.meta, "adapter": str(path)}
    return loaded
