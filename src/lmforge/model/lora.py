"""LoRA: trainable low-rank updates on a frozen Transformer's linears.

A LoRA layer adds `scaling * B @ A` to a frozen weight W (A: (r, in), B: (out, r), B starts at
zero, so the adapted model starts out equal to the base). Our linears fuse what Hugging Face
keeps apart (`attn.qkv` is q_proj/k_proj/v_proj, `mlp.up` is gate_proj/up_proj), so one
`LoraLinear` holds one (A, B) pair per `Slice` of output rows it updates. Which slices a model
has, what they are called in PEFT's files and how adapters are saved and loaded is
`lmforge.adapters`' business; this module is the layer arithmetic only.

The base may be a quantized layer (QLoRA): anything with a `dequantize()` that gives its
full-precision weight (`lmforge.compress.qlinear`'s layers). Its weight is dequantized on the
fly in forward and again in backward, so only the int8/int4 codes stay in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from pydantic import field_validator

from lmforge.config import Section
from lmforge.errors import LmforgeError
from lmforge.model import fused
from lmforge.native import onednn

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


class LoraSettings(Section):
    """r, alpha, dropout and target modules (Hugging Face short names, as PEFT spells them)."""

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


# ----------------------------------------------------------------------------- the layer

def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What B @ A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def is_quantized(layer: nn.Module) -> bool:
    """A base that stores codes and gives its weight through `dequantize()` (QLoRA)."""
    return callable(getattr(layer, "dequantize", None))


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T for a quantized W, dequantized in forward and again in backward: autograd keeps
    the int codes, never the full-precision weight (QLoRA's memory saving)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return onednn.matmul(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return onednn.grad_input(grad, ctx.layer.dequantize().to(grad.dtype)), None


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
        self.scaling = lora_scaling(r, alpha, use_rslora)
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

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_quantized(self.base) or not torch.is_grad_enabled():
            return fused.linear(self.base, x)
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
        weight = base.dequantize() if is_quantized(base) else base.weight.float()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        out.weight.copy_(weight + self.delta_weight())
        if base.bias is not None:
            out.bias.copy_(base.bias.float())
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, slices=[{', '.join(s.short_name for s in self.slices)}]"


# ----------------------------------------------------------------------------- on a model

def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, slices: list[Slice], r: int, alpha: float, dropout: float = 0.0,
             use_rslora: bool = False) -> dict[str, LoraLinear]:
    """Freeze `model` and put a fresh `LoraLinear` on every linear that `slices` name (in place,
    slices of one linear in their given order). Only the adapters' parameters require gradients
    afterwards. Returns the new layers by name."""
    if lora_layers(model):
        raise LmforgeError("the model already carries a LoRA adapter; merge it first (lmforge merge)")
    by_linear: dict[str, list[Slice]] = {}
    for s in slices:
        by_linear.setdefault(s.linear, []).append(s)
    for p in model.parameters():
        p.requires_grad_(False)
    for linear, own in by_linear.items():
        _set_module(model, linear, LoraLinear(model.get_submodule(linear), own, r, alpha, dropout, use_rslora))
    model.lora_targets = sorted({s.short_name for s in slices})
    return lora_layers(model)


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
