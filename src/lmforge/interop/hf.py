"""Hugging Face `config.json` keys and tensor names, through the per-family maps.

Our module names are our own (`blocks.3.attn.qkv`); Hugging Face's differ per family.
`lmforge.interop.families` holds one weight-name map per family; this module is their
front end: config.json both ways, the name checks, and splitting our fused tensors
into Hugging Face's (the streaming loader in `interop.weights` applies the rules the
other way, from files).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from lmforge.config import ModelConfig, describe_validation_error
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule, family_module, ignored

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def to_hf_config(cfg: ModelConfig, special_ids: dict[str, int | None] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
                           "vocab_size": cfg.vocab, "torch_dtype": HF_DTYPE_NAMES.get(dtype, "float32")}
    out.update(family_module(cfg.family).config_to_hf(cfg))
    if not cfg.causal:  # transformers has no such switch: an encoder directory is read back by lmforge only
        out["lmforge_bidirectional"] = True
    special_ids = dict(special_ids or {})
    if special_ids.get("bos_token_id") is None:
        # Our tokenizers have no separate begin token; as in GPT-2, end-of-text begins a text too.
        # Without this, transformers falls back to its own default id, which may not exist here.
        special_ids["bos_token_id"] = special_ids.get("eos_token_id")
    for key, value in special_ids.items():
        if value is not None:
            out[key] = value
    return out


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    module = family_module(hf.get("model_type"))
    try:
        cfg = module.config_from_hf(hf)
        return cfg.model_copy(update={"causal": False}) if hf.get("lmforge_bidirectional") else cfg
    except ValidationError as e:
        raise LmforgeError(describe_validation_error(e, "config.json")) from None
    except (TypeError, ValueError) as e:  # a key of the wrong type, e.g. a string where a number belongs
        raise LmforgeError(f"config.json is not a valid {hf.get('model_type')} config: {e}") from None


def weight_map(cfg: ModelConfig) -> list[Rule]:
    return family_module(cfg.family).weight_map(cfg)


def normalize_names(names, cfg: ModelConfig) -> dict[str, str]:
    """{normalized Hugging Face name: name as stored} without the tensors the family ignores."""
    module = family_module(cfg.family)
    out: dict[str, str] = {}
    for stored in names:
        name = module.normalize_name(stored)
        if ignored(name, module.IGNORED) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # buffers and the tied copy of the input embedding that some exporters save
        if name in out:
            raise LmforgeError(f"tensors {out[name]!r} and {stored!r} are the same weight twice")
        out[name] = stored
    return out


def check_names(present: set[str], cfg: ModelConfig, where: str) -> None:
    """Missing or unexpected tensors are errors that name one example and the file."""
    expected = {name for rule in weight_map(cfg) for name in rule.theirs}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise LmforgeError(f"{where}: weights are missing {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    if extra:
        raise LmforgeError(f"{where}: weights have {len(extra)} tensor(s) this {cfg.family} config does not use, "
                           f"e.g. {extra[0]}: does config.json belong to these weights?")


def split_rule(rule: Rule, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Hugging Face tensor(s) one of our tensors becomes."""
    if rule.kind == "transpose":
        return {rule.theirs[0]: tensor.t().contiguous()}
    if rule.kind == "concat":
        return {name: part.contiguous() for name, part in zip(rule.theirs, tensor.split(list(rule.sizes)))}
    if rule.kind == "plus_one":
        return {rule.theirs[0]: (tensor.float() - 1).to(tensor.dtype)}
    return {rule.theirs[0]: tensor}
