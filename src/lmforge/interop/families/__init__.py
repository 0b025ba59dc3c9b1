"""One weight-name map per Hugging Face model family, kept apart from the model code.

A family module knows three things: how its `config.json` maps onto `ModelConfig`
(both ways), and a list of `Rule`s saying which Hugging Face tensor(s) make each of our
tensors. The same rules drive import (streamed, tensor by tensor), export, GGUF and the
name checks, so a family is described once.

    gpt2                      GPT2LMHeadModel (Conv1D weights are stored transposed)
    llama, qwen2, mistral     LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
    phi3                      Phi3ForCausalLM (fused qkv_proj and gate_up_proj)
    qwen3                     Qwen3ForCausalLM (per-head q/k norms)
    mixtral, qwen3_moe        MixtralForCausalLM / Qwen3MoeForCausalLM (mixture of experts)
    qwen2_moe                 Qwen2MoeForCausalLM (mixture of experts with a shared expert)
    gemma, gemma2, gemma3     GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM (gemma3_text)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` is made of the Hugging Face tensor(s) `theirs`.

    same:      one tensor, same layout.
    transpose: one 2-D tensor stored transposed (GPT-2's Conv1D).
    concat:    several tensors stacked along dim 0, of `sizes` rows each (fused q/k/v, gate/up).
    plus_one:  one tensor w of a norm that scales by (1 + w) (Gemma): ours is 1 + w.
    """

    ours: str
    theirs: tuple[str, ...]
    kind: Literal["same", "transpose", "concat", "plus_one"] = "same"
    sizes: tuple[int, ...] = ()

    @staticmethod
    def same(ours: str, theirs: str) -> "Rule":
        return Rule(ours, (theirs,))

    @staticmethod
    def transpose(ours: str, theirs: str) -> "Rule":
        return Rule(ours, (theirs,), "transpose")

    @staticmethod
    def plus_one(ours: str, theirs: str) -> "Rule":
        return Rule(ours, (theirs,), "plus_one")

    @staticmethod
    def concat(ours: str, theirs: list[str], sizes: list[int]) -> "Rule":
        return Rule(ours, tuple(theirs), "concat", tuple(sizes))


def family_module(model_type: Any) -> ModuleType:
    from lmforge.interop.families import gemma, gpt2, llama, moe, phi3, qwen3

    modules = {"gpt2": gpt2, "llama": llama, "qwen2": llama, "mistral": llama, "phi3": phi3, "qwen3": qwen3,
               "mixtral": moe, "qwen3_moe": moe, "qwen2_moe": moe, "gemma": gemma, "gemma2": gemma,
               "gemma3_text": gemma,
               "gemma3": gemma}  # our family name; as a model_type, gemma.config_from_hf refuses it
    if model_type not in modules:
        raise LmforgeError(f"unsupported model_type {model_type!r} in config.json: lmforge reads "
                           f"{', '.join(modules)}")
    return modules[model_type]


SUPPORTED = ("gpt2", "llama", "qwen2", "mistral", "phi3", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "gemma",
             "gemma2", "gemma3_text")


def require(hf: dict[str, Any], key: str, kind: type = int) -> Any:
    """A config.json key that must be present and of the right type."""
    value = hf.get(key)
    if value is None:
        raise LmforgeError(f"config.json lacks {key!r}, which a {hf.get('model_type')} model needs")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise LmforgeError(f"config.json: {key} must be a positive integer, not {value!r}")
    return value


def ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)
