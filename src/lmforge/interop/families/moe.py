"""Mixture-of-experts families: Mixtral (`MixtralForCausalLM`, mistral attention), Qwen3-MoE
(`Qwen3MoeForCausalLM`, qwen3 attention) and Qwen2-MoE (`Qwen2MoeForCausalLM`, qwen2 attention
with q/k/v biases, and a shared expert beside the routed ones). Their checkpoints keep each expert's
gate/up/down projections as separate tensors (transformers fuses them only in memory);
lmforge fuses gate and up per expert as it does for a dense MLP.

    mixtral     block_sparse_moe.gate (router), block_sparse_moe.experts.E.w1/w3/w2
    qwen3_moe   mlp.gate (router), mlp.experts.E.gate_proj/up_proj/down_proj
    qwen2_moe   as qwen3_moe, plus mlp.shared_expert.gate_proj/up_proj/down_proj and
                mlp.shared_expert_gate

Qwen3-MoE's and Qwen2-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step` > 1) are refused.
Mixtral's `router_jitter_noise` is training-time noise and is not imported.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, llama, qwen3, require

IGNORED = llama.IGNORED
normalize_name = llama.normalize_name

# Per family: the router's and the experts' tensor names under model.layers.N., and each
# expert's (gate, up, down) projection names.
NAMES = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts", ("w1", "w3", "w2")),
         "qwen3_moe": ("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
         "qwen2_moe": ("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj"))}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf["model_type"]
    if family == "mixtral":
        experts = require(hf, "num_local_experts")
        return ModelConfig(**llama.base_config(hf, family, sliding_window=hf.get("sliding_window"),
                                               n_experts=experts, experts_per_token=require(hf, "num_experts_per_tok"),
                                               moe_norm_topk=True))
    if family == "qwen3_moe":
        qwen3.check_attention(hf)
    elif hf.get("use_sliding_window"):
        raise LmforgeError(f"{family} models with use_sliding_window are not supported")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise LmforgeError(f"{family} models with dense layers (mlp_only_layers, decoder_sparse_step > 1) are not "
                           "supported: every layer must be a mixture of experts")
    experts = hf.get("num_experts") or require(hf, "num_local_experts")
    extra = {}
    if family == "qwen2_moe":
        extra = dict(qkv_bias=bool(hf.get("qkv_bias", True)),
                     moe_shared_d_ff=hf.get("shared_expert_intermediate_size") or None)
    return ModelConfig(**llama.base_config(hf, family, n_experts=experts, **extra,
                                           experts_per_token=require(hf, "num_experts_per_tok"),
                                           moe_d_ff=require(hf, "moe_intermediate_size"),
                                           moe_norm_topk=bool(hf.get("norm_topk_prob", False))))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = llama.base_config_to_hf(cfg)
    if cfg.family == "mixtral":
        if not cfg.moe_norm_topk or cfg.moe_d_ff not in (None, cfg.ffn_dim) or cfg.has_qkv_bias or cfg.has_qk_norm:
            raise LmforgeError("a mixtral model renormalizes its top-k weights and has experts of size d_ff, "
                               "no q/k/v biases and no q/k norms")
        return {**out, "intermediate_size": cfg.expert_dim, "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.experts_per_token, "sliding_window": cfg.sliding_window,
                "router_aux_loss_coef": cfg.router_aux_coef, "output_router_logits": False}
    if cfg.family == "qwen2_moe":
        if cfg.has_qk_norm:
            raise LmforgeError("a qwen2_moe model has no q/k norms")
        attention = dict(qkv_bias=cfg.has_qkv_bias, use_sliding_window=False, sliding_window=None,
                         shared_expert_intermediate_size=cfg.moe_shared_d_ff or 0)
    else:
        attention = qwen3.attention_to_hf(cfg)
    if cfg.moe_shared_d_ff and cfg.family != "qwen2_moe":
        raise LmforgeError(f"a {cfg.family} model has no shared expert (qwen2_moe has)")
    return {**out, **attention, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.experts_per_token, "moe_intermediate_size": cfg.expert_dim,
            "norm_topk_prob": cfg.moe_norm_topk, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": cfg.router_aux_coef, "output_router_logits": False}


def expert_rules(cfg: ModelConfig) -> list[Rule]:
    router, experts, (gate, up, down) = NAMES[cfg.family]
    ffn = cfg.expert_dim
    rules = []
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}."
        rules.append(Rule.same(ours + "router.weight", f"{theirs}{router}.weight"))
        for e in range(cfg.n_experts):
            expert = f"{theirs}{experts}.{e}."
            rules += [Rule.concat(f"{ours}experts.{e}.up.weight", [f"{expert}{gate}.weight", f"{expert}{up}.weight"],
                                  [ffn, ffn]),
                      Rule.same(f"{ours}experts.{e}.down.weight", f"{expert}{down}.weight")]
        if cfg.moe_shared_d_ff:
            shared, size = f"{theirs}mlp.shared_expert.", cfg.moe_shared_d_ff
            rules += [Rule.concat(ours + "shared.up.weight", [shared + "gate_proj.weight", shared + "up_proj.weight"],
                                  [size, size]),
                      Rule.same(ours + "shared.down.weight", shared + "down_proj.weight"),
                      Rule.same(ours + "shared_gate.weight", f"{theirs}mlp.shared_expert_gate.weight")]
    return rules


def weight_map(cfg: ModelConfig) -> list[Rule]:
    attention = [r for r in llama.weight_map(cfg) if ".mlp." not in r.ours]  # the dense MLP's rules go
    norms = qwen3.qk_norm_rules(cfg) if cfg.family == "qwen3_moe" else []
    return attention + norms + expert_rules(cfg)
