"""Phi-3 (`Phi3ForCausalLM`): the Llama design with q/k/v and gate/up already fused,
as lmforge fuses them, and an optional sliding window. Partial rotary embeddings
(Phi-4-mini) and LongRoPE scaling (the 128k models) are refused, not approximated.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule
from lmforge.interop.families.llama import base_config, base_config_to_hf, common_rules

IGNORED = (r"rotary_emb\.inv_freq$",)


def normalize_name(name: str) -> str:
    return name


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise LmforgeError(f"phi3 with partial_rotary_factor {partial} is not supported (1.0 only)")
    return ModelConfig(**base_config(hf, "phi3", sliding_window=hf.get("sliding_window")))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**base_config_to_hf(cfg), "sliding_window": cfg.sliding_window, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "original_max_position_embeddings": cfg.context}


def weight_map(cfg: ModelConfig) -> list[Rule]:
    def layer(ours: str, theirs: str) -> list[Rule]:
        return [Rule.same(ours + "attn.qkv.weight", theirs + "self_attn.qkv_proj.weight"),
                Rule.same(ours + "mlp.up.weight", theirs + "mlp.gate_up_proj.weight")]

    return common_rules(cfg, layer)
