"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU MLP, tied embeddings.

Its Conv1D layers store weights as (in, out), the transpose of `nn.Linear`.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, require

# Causal-mask buffers that older checkpoints carry.
IGNORED = (r"\.attn\.(masked_)?bias$",)


def normalize_name(name: str) -> str:
    """The original OpenAI checkpoints name tensors without the `transformer.` prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LmforgeError(f"gpt2 activation {act!r} is not supported (gelu_new only)")
    d = require(hf, "n_embd")
    return ModelConfig(family="gpt2", vocab_size=require(hf, "vocab_size"), n_layer=require(hf, "n_layer"),
                       n_head=require(hf, "n_head"), d_model=d, d_ff=hf.get("n_inner") or 4 * d,
                       context=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=True)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(n_positions=cfg.context, n_ctx=cfg.context, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.ffn_dim, activation_function="gelu_new",
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.dropout, initializer_range=cfg.init_std, tie_word_embeddings=True,
                scale_attn_weights=True)


def weight_map(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule.same("tok_emb.weight", "transformer.wte.weight"),
             Rule.same("pos_emb.weight", "transformer.wpe.weight")]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for o, t in (("norm1", "ln_1"), ("norm2", "ln_2")):
            rules += [Rule.same(f"{ours}{o}.weight", f"{theirs}{t}.weight"),
                      Rule.same(f"{ours}{o}.bias", f"{theirs}{t}.bias")]
        for o, t in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            rules += [Rule.transpose(f"{ours}{o}.weight", f"{theirs}{t}.weight"),
                      Rule.same(f"{ours}{o}.bias", f"{theirs}{t}.bias")]
    rules += [Rule.same("norm_f.weight", "transformer.ln_f.weight"),
              Rule.same("norm_f.bias", "transformer.ln_f.bias")]
    return rules
