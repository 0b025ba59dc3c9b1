"""Hugging Face config keys and tensor names, one adapter per family.

Our module names are our own (`blocks.3.attn.qkv`); Hugging Face's differ per family
(`transformer.h.3.attn.c_attn` with transposed Conv1D weights for GPT-2;
`model.layers.3.self_attn.{q,k,v}_proj` for Llama-style models). The adapters below are
the only place that knows both, so the model file never does.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError

LLAMA_LIKE = ("llama", "qwen2", "mistral")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


# ----------------------------------------------------------------------------- config.json

def to_hf_config(cfg: ModelConfig, special_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    ids = special_ids or {}
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
                           "vocab_size": cfg.vocab, "torch_dtype": "float32"}
    if cfg.family == "gpt2":
        out.update(n_positions=cfg.context, n_ctx=cfg.context, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                   n_head=cfg.n_head, n_inner=cfg.ffn_dim, activation_function="gelu_new",
                   layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                   attn_pdrop=cfg.dropout, initializer_range=cfg.init_std, tie_word_embeddings=True,
                   scale_attn_weights=True)
    else:
        out.update(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
                   num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head,
                   max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                   rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                   attention_dropout=cfg.dropout, initializer_range=cfg.init_std)
        if cfg.rope_scaling is not None:
            out["rope_scaling"] = cfg.rope_scaling.model_dump()
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
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if ids.get(key) is not None:
            out[key] = ids[key]
    return out


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise LmforgeError(f"unsupported model_type {family!r} in config.json: lmforge reads {', '.join(ARCHITECTURES)}")
    if family == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmforgeError(f"gpt2 activation {hf['activation_function']!r} is not supported (gelu_new only)")
        return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                           d_model=hf["n_embd"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                           context=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=True)
    rope = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise LmforgeError(f"rope scaling {scaling.get('rope_type')!r} is not supported (llama3 only)")
        scaling = RopeScaling(**{k: scaling[k] for k in RopeScaling.model_fields if k in scaling})
    else:
        scaling = None
    if family == "llama" and (hf.get("mlp_bias") or hf.get("attention_bias")):
        raise LmforgeError("llama models with attention_bias or mlp_bias are not supported")
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
        context=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        sliding_window=hf.get("sliding_window") if family == "mistral" else None,
    )


# ----------------------------------------------------------------------------- tensors

def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face tensor names and layouts (tied lm_head dropped)."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = state["tok_emb.weight"]
        out["transformer.wpe.weight"] = state["pos_emb.weight"]
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[dst + theirs + ".weight"] = state[src + ours + ".weight"]
                out[dst + theirs + ".bias"] = state[src + ours + ".bias"]
            # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear.
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[dst + theirs + ".weight"] = state[src + ours + ".weight"].t().contiguous()
                out[dst + theirs + ".bias"] = state[src + ours + ".bias"]
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = state["norm_f.bias"]
        return out
    q_dim, kv_dim = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    out["model.embed_tokens.weight"] = state["tok_emb.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "norm1.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "norm2.weight"]
        for suffix in ("weight", "bias"):
            fused = state.get(src + "attn.qkv." + suffix)
            if fused is None:
                continue
            q, k, v = fused.split([q_dim, kv_dim, kv_dim], dim=0)
            out[dst + f"self_attn.q_proj.{suffix}"] = q.contiguous()
            out[dst + f"self_attn.k_proj.{suffix}"] = k.contiguous()
            out[dst + f"self_attn.v_proj.{suffix}"] = v.contiguous()
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.proj.weight"]
        gate, up = state[src + "mlp.up.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.contiguous()
        out[dst + "mlp.up_proj.weight"] = up.contiguous()
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.down.weight"]
    out["model.norm.weight"] = state["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    from lmforge.model import Transformer  # local: only names are needed, on the meta device

    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    return set(to_hf_state_dict(state, cfg))


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict. Missing or unexpected tensors are errors."""
    expected = expected_hf_names(cfg)
    present = set(hf)
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some exporters save the tied copy too
    present = {n for n in present if not n.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise LmforgeError(f"weights are missing {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    if extra:
        raise LmforgeError(f"weights have {len(extra)} tensor(s) this config does not use, e.g. {extra[0]}: "
                           "does config.json belong to these weights?")
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        out["tok_emb.weight"] = hf["transformer.wte.weight"]
        out["pos_emb.weight"] = hf["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[dst + ours + ".weight"] = hf[src + theirs + ".weight"]
                out[dst + ours + ".bias"] = hf[src + theirs + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[dst + ours + ".weight"] = hf[src + theirs + ".weight"].t()
                out[dst + ours + ".bias"] = hf[src + theirs + ".bias"]
        out["norm_f.weight"] = hf["transformer.ln_f.weight"]
        out["norm_f.bias"] = hf["transformer.ln_f.bias"]
        out["lm_head.weight"] = out["tok_emb.weight"]
        return out
    out["tok_emb.weight"] = hf["model.embed_tokens.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "norm1.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "norm2.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "attn.qkv.weight"] = torch.cat([hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        if cfg.has_qkv_bias:
            out[dst + "attn.qkv.bias"] = torch.cat([hf[src + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        out[dst + "attn.proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.up.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.down.weight"] = hf[src + "mlp.down_proj.weight"]
    out["norm_f.weight"] = hf["model.norm.weight"]
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return out
