"""Gemma (`GemmaForCausalLM`), Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3's text model
(`Gemma3ForCausalLM`, model_type gemma3_text): Llama's tensor names, with

- RMSNorm weights stored as w for a norm that multiplies by (1 + w): they become 1 + w here
  (`Rule.plus_one`) and w again on export, so the model runs a plain RMSNorm;
- gemma2/3: `post_attention_layernorm` normalizes the attention output (in Llama it is the norm
  before the MLP, which Gemma 2 calls `pre_feedforward_layernorm`), `post_feedforward_layernorm`
  the MLP output;
- gemma3: per-head `q_norm`/`k_norm`, and a rope base of its own for the sliding layers.

The multimodal Gemma 3 (`Gemma3ForConditionalGeneration`, model_type gemma3) is refused.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, require
from lmforge.interop.families.llama import rope_from_hf

IGNORED = (r"rotary_emb\.", r"embed_scale$")
FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
MODEL_TYPE = {family: model_type for model_type, family in FAMILY.items()}
# What transformers assumes where a config.json leaves a key out.
DEFAULTS = {"gemma2": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                       "final_logit_softcapping": 30.0, "sliding_window": 4096},
            "gemma3": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
                       "final_logit_softcapping": None, "sliding_window": 4096}}
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # transformers reads Gemma's legacy "gelu" as the tanh form


def normalize_name(name: str) -> str:
    return name


def _layer_types(hf: dict[str, Any], family: str, n_layer: int) -> list[str]:
    """Which layers slide: config.json's layer_types, else the pattern transformers derives
    (gemma2: every other layer from the first; gemma3: all but every `sliding_window_pattern`-th)."""
    if hf.get("layer_types") is not None:
        types = list(hf["layer_types"])
        bad = [t for t in types if t not in ("sliding_attention", "full_attention")]
        if bad or len(types) != n_layer:
            raise LmforgeError(f"config.json: layer_types must list sliding_attention or full_attention for each "
                               f"of the {n_layer} layers, not {types!r}")
        return types
    period = 2 if family == "gemma2" else hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layer)]


def _rope(hf: dict[str, Any], family: str) -> dict[str, Any]:
    if family != "gemma3":
        theta, scaling = rope_from_hf(hf)
        return dict(rope_theta=theta, rope_scaling=scaling)
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one set per layer type
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise LmforgeError(f"gemma3 rope scaling {local['rope_type']!r} on the sliding layers is not supported")
        theta, scaling = rope_from_hf({"rope_parameters": full})
        return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local.get("rope_theta", 10000.0))
    theta, scaling = rope_from_hf({"rope_theta": hf.get("rope_theta", 1_000_000.0), "rope_scaling": hf.get("rope_scaling")})
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=hf.get("rope_local_base_freq", 10000.0))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf["model_type"] == "gemma3":
        raise LmforgeError("model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration: lmforge reads "
                           "Gemma 3's text model (model_type gemma3_text, Gemma3ForCausalLM)")
    family = FAMILY[hf["model_type"]]
    if hf.get("attention_bias"):
        raise LmforgeError(f"{family} models with attention_bias are not supported")
    if hf.get("use_bidirectional_attention"):
        raise LmforgeError(f"{family} with use_bidirectional_attention (an embedding model) is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise LmforgeError(f"{family} activation {act!r} is not supported (gelu_pytorch_tanh only)")
    n_head, n_layer = require(hf, "num_attention_heads"), require(hf, "num_hidden_layers")
    fields = dict(family=family, vocab_size=require(hf, "vocab_size"), n_layer=n_layer, n_head=n_head,
                  n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=require(hf, "hidden_size"),
                  head_dim=hf.get("head_dim"), d_ff=require(hf, "intermediate_size"),
                  context=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)), **_rope(hf, family))
    if family in DEFAULTS:
        get = lambda key: hf.get(key, DEFAULTS[family][key])  # noqa: E731
        # transformers' Gemma 3 never soft-caps attention scores, whatever its config says
        attn_softcap = get("attn_logit_softcapping") if family == "gemma2" else None
        types = _layer_types(hf, family, n_layer)
        window = get("sliding_window") if "sliding_attention" in types else None  # unused when no layer slides
        fields.update(query_pre_attn_scalar=get("query_pre_attn_scalar"), attn_softcap=attn_softcap,
                      logit_softcap=get("final_logit_softcapping"), sliding_window=window, layer_types=types)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(model_type=MODEL_TYPE[cfg.family], hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
               num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
               head_dim=cfg.dim_head, max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
               attention_dropout=cfg.dropout, initializer_range=cfg.init_std)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling.to_hf()
    if cfg.family == "gemma":
        if cfg.query_pre_attn_scalar is not None:
            raise LmforgeError("query_pre_attn_scalar needs family gemma2 or gemma3 in Hugging Face")
        return {**out, "hidden_act": "gelu_pytorch_tanh"}
    out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_head,
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
               # transformers builds a sliding mask for gemma2/3 whatever layer_types says, so it needs a
               # window even when no layer slides; the context's length changes nothing then
               sliding_window=cfg.sliding_window if cfg.sliding_window is not None else cfg.context,
               layer_types=cfg.layer_types or [("full_attention" if cfg.sliding_window is None else "sliding_attention")
                                               for _ in range(cfg.n_layer)])
    if cfg.family == "gemma3":
        out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
        out["use_bidirectional_attention"] = False
    return out


def weight_map(cfg: ModelConfig) -> list[Rule]:
    q, kv, ffn = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ffn_dim
    rules = [Rule.same("tok_emb.weight", "model.embed_tokens.weight")]
    # Gemma 2 and 3 have four norms a layer, and post_attention_layernorm changes meaning.
    norms = ({"norm1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
              "norm2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"} if cfg.post_norms
             else {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"})
    if cfg.has_qk_norm:
        norms |= {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        rules += [Rule.plus_one(f"{ours}{o}.weight", f"{theirs}{t}.weight") for o, t in norms.items()]
        rules += [Rule.concat(ours + "attn.qkv.weight", [f"{theirs}self_attn.{p}_proj.weight" for p in "qkv"],
                              [q, kv, kv]),
                  Rule.same(ours + "attn.proj.weight", theirs + "self_attn.o_proj.weight"),
                  Rule.concat(ours + "mlp.up.weight", [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"],
                              [ffn, ffn]),
                  Rule.same(ours + "mlp.down.weight", theirs + "mlp.down_proj.weight")]
    rules.append(Rule.plus_one("norm_f.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(Rule.same("lm_head.weight", "lm_head.weight"))
    return rules
