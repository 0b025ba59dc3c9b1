"""Qwen3 (`Qwen3ForCausalLM`): the Llama design (no q/k/v biases, head_dim of its own) with
an RMSNorm on each query and key head before RoPE (`self_attn.q_norm`, `self_attn.k_norm`)."""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, llama

IGNORED = llama.IGNORED
normalize_name = llama.normalize_name


def check_attention(hf: dict[str, Any]) -> None:
    """What a Qwen3-style config may hold that lmforge does not model."""
    family = hf.get("model_type")
    if hf.get("attention_bias"):
        raise LmforgeError(f"{family} models with attention_bias are not supported")
    if hf.get("use_sliding_window"):
        raise LmforgeError(f"{family} models with use_sliding_window are not supported")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_attention(hf)
    return ModelConfig(**llama.base_config(hf, "qwen3"))


def attention_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.has_qkv_bias or not cfg.has_qk_norm:
        raise LmforgeError(f"the {cfg.family} family has q/k norms and no q/k/v biases in Hugging Face")
    return dict(attention_bias=False, use_sliding_window=False, sliding_window=None)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**llama.base_config_to_hf(cfg), **attention_to_hf(cfg)}


def qk_norm_rules(cfg: ModelConfig) -> list[Rule]:
    return [Rule.same(f"blocks.{i}.attn.{n}.weight", f"model.layers.{i}.self_attn.{n}.weight")
            for i in range(cfg.n_layer) for n in ("q_norm", "k_norm")]


def weight_map(cfg: ModelConfig) -> list[Rule]:
    return llama.weight_map(cfg) + qk_norm_rules(cfg)
