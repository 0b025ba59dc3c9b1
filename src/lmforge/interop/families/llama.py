"""Llama and the families that share its tensor names: Qwen2 (q/k/v biases) and Mistral
(sliding-window attention). RoPE (with Llama-3 frequency scaling), RMSNorm, SwiGLU, GQA.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, require

IGNORED = (r"rotary_emb\.inv_freq$",)


def normalize_name(name: str) -> str:
    return name


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and linear, Llama-3 or YaRN scaling, from either the legacy keys or transformers 5's
    `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    if kind not in ("llama3", "yarn", "linear"):
        raise LmforgeError(f"rope scaling {kind!r} is not supported (default, linear, llama3 and yarn only)")
    fields = {k: scaling[k] for k in RopeScaling.model_fields if scaling.get(k) is not None}
    if kind == "yarn":  # as transformers: without them, the factor and context come from the config
        fields.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        fields.setdefault("factor", hf.get("max_position_embeddings", 2048) / fields["original_max_position_embeddings"])
    return theta, RopeScaling(**{**fields, "rope_type": kind})


def base_config(hf: dict[str, Any], family: str, **extra: Any) -> dict[str, Any]:
    """ModelConfig fields every RoPE family reads the same way."""
    theta, scaling = rope_from_hf(hf)
    n_head = require(hf, "num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"activation {hf['hidden_act']!r} is not supported for {family} (silu only)")
    return dict(family=family, vocab_size=require(hf, "vocab_size"), n_layer=require(hf, "num_hidden_layers"),
                n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=require(hf, "hidden_size"),
                head_dim=hf.get("head_dim"), d_ff=require(hf, "intermediate_size"),
                context=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                **extra)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf["model_type"]
    if family == "llama" and (hf.get("mlp_bias") or hf.get("attention_bias")):
        raise LmforgeError("llama models with attention_bias or mlp_bias are not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise LmforgeError("qwen2 models with use_sliding_window are not supported")
    return ModelConfig(**base_config(hf, family, qkv_bias=family == "qwen2",
                                     sliding_window=hf.get("sliding_window") if family == "mistral" else None))


def base_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
               num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head,
               max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
               rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
               attention_dropout=cfg.dropout, initializer_range=cfg.init_std)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling.to_hf()
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = base_config_to_hf(cfg)
    if cfg.family == "llama":
        if cfg.has_qkv_bias:
            raise LmforgeError("q/k/v biases are the qwen2 family's: set model.family qwen2")
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.family == "qwen2":
        if not cfg.has_qkv_bias:
            raise LmforgeError("the qwen2 family always has q/k/v biases in Hugging Face; use family llama")
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def common_rules(cfg: ModelConfig, layer_rules) -> list[Rule]:
    """Embeddings, norms, output head, and `layer_rules(ours_prefix, theirs_prefix)` per layer."""
    rules = [Rule.same("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        rules += [Rule.same(ours + "norm1.weight", theirs + "input_layernorm.weight"),
                  Rule.same(ours + "norm2.weight", theirs + "post_attention_layernorm.weight"),
                  Rule.same(ours + "attn.proj.weight", theirs + "self_attn.o_proj.weight"),
                  Rule.same(ours + "mlp.down.weight", theirs + "mlp.down_proj.weight"),
                  *layer_rules(ours, theirs)]
    rules.append(Rule.same("norm_f.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(Rule.same("lm_head.weight", "lm_head.weight"))
    return rules


def weight_map(cfg: ModelConfig) -> list[Rule]:
    q, kv, ffn = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ffn_dim

    def layer(ours: str, theirs: str) -> list[Rule]:
        out = [Rule.concat(ours + "attn.qkv.weight", [f"{theirs}self_attn.{p}_proj.weight" for p in "qkv"], [q, kv, kv]),
               Rule.concat(ours + "mlp.up.weight", [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"],
                           [ffn, ffn])]
        if cfg.has_qkv_bias:
            out.append(Rule.concat(ours + "attn.qkv.bias", [f"{theirs}self_attn.{p}_proj.bias" for p in "qkv"],
                                   [q, kv, kv]))
        return out

    return common_rules(cfg, layer)
