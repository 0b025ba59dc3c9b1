"""Typed, validated configuration: the model, the data, training, evaluation and the run.

A recipe is one YAML file with a section per concern. Every key has a typed default,
unknown keys are errors, and any key can be overridden from the command line with a
dotted flag (`--train.lr 3e-4`). The fully resolved recipe is what a run records.

Every YAML config of lmforge (this pretraining recipe, the fine-tuning config, the cleaning
recipe) is a tree of `Section`s read by `load_config`: one way to find the file, read it,
merge overrides and word its errors; each keeps its own schema.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmforge.errors import LmforgeError

Family = Literal["gpt2", "llama", "qwen2", "mistral", "phi3", "qwen3", "mixtral", "qwen3_moe",
                 "gemma", "gemma2", "gemma3", "qwen2_moe"]
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
LayerType = Literal["sliding_attention", "full_attention"]


class Section(BaseModel):
    """A config section. A sub-section whose default is an instance with its own settings (the
    fine-tuning `train` section: lr 1e-4, warmup 10, ...) keeps them when the input gives only
    some of its keys: `--train.max_steps 3` changes max_steps, not every other key back to the
    class defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _under_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            default, given = field.default, data.get(name)
            if isinstance(default, BaseModel) and isinstance(given, dict):
                data = {**data, name: deep_merge(default.model_dump(exclude_unset=True), given)}
        return data


class RopeScaling(Section):
    """RoPE frequency scaling as transformers defines it (`rope_type` in HF configs).

    llama3: long wavelengths slowed by `factor`, short ones kept, the band between blended
    (`low_freq_factor`, `high_freq_factor`).
    linear: every frequency divided by `factor` (positions interpolated; Gemma 3's global layers).
    yarn: frequencies blended between interpolated (/ `factor`) and original along a ramp set by
    `beta_fast`/`beta_slow` rotations; cos/sin scaled by `attention_factor` (None: derived from
    `factor`, `mscale` and `mscale_all_dim`).
    """

    rope_type: Literal["llama3", "yarn", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        """The keys transformers reads for this rope_type."""
        keys = {"llama3": ("low_freq_factor", "high_freq_factor"),
                "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")}
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        out = {"rope_type": self.rope_type, "factor": self.factor,
               "original_max_position_embeddings": self.original_max_position_embeddings}
        out.update({k: getattr(self, k) for k in keys[self.rope_type] if getattr(self, k) is not None})
        return out


class ModelConfig(Section):
    """One decoder-only Transformer; `family` picks the block design.

    gpt2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.
    qwen2: llama with q/k/v biases.  mistral: llama with sliding-window attention.
    phi3: llama with an optional sliding window (Hugging Face stores its q/k/v and gate/up fused).
    qwen3: llama with an RMSNorm on each query and key head before RoPE (`qk_norm`).
    mixtral: mistral with a mixture-of-experts MLP; qwen3_moe: qwen3 with one; qwen2_moe: qwen2 with
    one that also has a shared expert.
    gemma: llama with embeddings scaled by sqrt(d_model) and a GeGLU MLP (gelu-tanh gate).
    gemma2: gemma with a second RMSNorm after attention and after the MLP (on their outputs),
    `query_pre_attn_scalar`, soft-capped attention scores and logits (`attn_softcap`,
    `logit_softcap`: c * tanh(x / c)) and sliding-window layers as `layer_types` says.
    gemma3: gemma2 with `qk_norm`, its own rope base for the sliding layers (`rope_local_theta`)
    and no soft-capping of attention scores (transformers ignores the key for gemma3).
    Gemma's (1 + w) RMSNorm weights are stored as 1 + w (interop adds and removes the 1), so the
    norm is the plain RMSNorm every consumer (the native decoder, GGUF, quantization) knows.

    Mixture of experts (`n_experts` > 0, the mixtral and qwen3_moe families): each token's
    router picks `experts_per_token` SwiGLU experts of hidden size `moe_d_ff` (None: d_ff) by
    softmax probability; their outputs are summed weighted by those probabilities, renormalized
    over the chosen ones when `moe_norm_topk` (mixtral always; qwen3_moe's norm_topk_prob).
    `moe_shared_d_ff`: a shared SwiGLU expert of that hidden size that every token runs, its
    output scaled by sigmoid(shared_gate . x) and added to the routed experts' (qwen2_moe).
    `router_aux_coef` > 0 adds the Switch-Transformer load-balancing loss to the gradients in
    training (it does not change the reported loss).
    """

    family: Family = "llama"
    vocab_size: int | None = None  # None: taken from the tokenizer
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention)
    d_model: int = 384
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int | None = None  # None: 4*d_model (gpt2) or ~8/3*d_model rounded to 64 (llama)
    context: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    qkv_bias: bool | None = None  # None: the family's default (gpt2, qwen2: yes)
    sliding_window: int | None = None  # mistral and phi3 only
    dropout: float = 0.0
    init_std: float = 0.02
    causal: bool = True  # False: a bidirectional encoder (masked-LM pretraining, task heads); no KV cache
    qk_norm: bool | None = None  # None: the family's default (qwen3, qwen3_moe: yes)
    n_experts: int = 0  # mixture of experts: experts per layer (mixtral, qwen3_moe); 0: a dense MLP
    experts_per_token: int = 2
    moe_d_ff: int | None = None  # each expert's hidden size; None: d_ff
    moe_norm_topk: bool = True  # renormalize the chosen experts' probabilities to sum to 1
    router_aux_coef: float = 0.0  # load-balancing loss weight in training; 0: off
    moe_shared_d_ff: int | None = None  # a shared expert every token runs, gated by sigmoid (qwen2_moe); None: none
    query_pre_attn_scalar: int | None = None  # attention scores scaled by its -1/2 power; None: head_dim
    attn_softcap: float | None = None  # gemma2: attention scores -> c * tanh(scores / c)
    logit_softcap: float | None = None  # gemma2/3: output logits -> c * tanh(logits / c)
    layer_types: list[LayerType] | None = None  # gemma2/3: which layers use sliding_window; None: all
    rope_local_theta: float | None = None  # gemma3: the rope base of the sliding_attention layers

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for name in ("n_layer", "n_head", "d_model", "context"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.family == "gpt2":
            if self.kv_heads != self.n_head:
                raise ValueError("the gpt2 family has no grouped-query attention: leave n_kv_head unset")
            if not self.tie_embeddings:
                raise ValueError("the gpt2 family always ties its input and output embeddings")
        if self.sliding_window is not None and self.family not in ("mistral", "phi3", "mixtral", "gemma2", "gemma3"):
            raise ValueError("sliding_window is a mistral-, mixtral-, phi3-, gemma2- or gemma3-family setting")
        self._check_gemma()
        if (self.n_experts > 0) != (self.family in MOE_FAMILIES):
            raise ValueError(f"n_experts > 0 goes with a mixture-of-experts family ({', '.join(MOE_FAMILIES)}), "
                             "and those families need n_experts > 0")
        if self.n_experts > 0 and not 0 < self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token must be in 1..n_experts ({self.n_experts})")
        if self.router_aux_coef < 0:
            raise ValueError("router_aux_coef must be >= 0")
        if self.moe_shared_d_ff is not None and (self.n_experts == 0 or self.moe_shared_d_ff <= 0):
            raise ValueError("moe_shared_d_ff is a positive size, for a mixture-of-experts family")
        if self.uses_rope and self.dim_head % 2:
            raise ValueError(f"RoPE turns pairs of dimensions: the {self.family} family needs an even head_dim, "
                             f"not {self.dim_head} (set head_dim, or d_model and n_head)")
        if self.rope_scaling is not None and not self.uses_rope:
            raise ValueError("rope_scaling needs a RoPE family (llama, qwen2, mistral)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not self.causal and self.sliding_window is not None:
            raise ValueError("a bidirectional encoder (causal: false) has no sliding window")
        return self

    def _check_gemma(self) -> None:
        later = self.family in ("gemma2", "gemma3")
        for name in ("logit_softcap", "layer_types"):
            if getattr(self, name) is not None and not later:
                raise ValueError(f"{name} is a gemma2- or gemma3-family setting")
        if self.attn_softcap is not None and self.family != "gemma2":
            raise ValueError("attn_softcap is a gemma2-family setting")
        for name in ("query_pre_attn_scalar", "attn_softcap", "logit_softcap", "rope_local_theta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ValueError(f"layer_types lists {len(self.layer_types)} layers for n_layer {self.n_layer}")
            if self.sliding_window is None and "sliding_attention" in self.layer_types:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.rope_local_theta is not None and self.family != "gemma3":
            raise ValueError("rope_local_theta is a gemma3-family setting")

    # Derived properties: one place decides what each family means.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def expert_dim(self) -> int:
        return self.moe_d_ff or self.ffn_dim

    @property
    def has_qk_norm(self) -> bool:
        if self.qk_norm is not None:
            return self.qk_norm
        return self.family in ("qwen3", "qwen3_moe", "gemma3")

    @property
    def is_gemma(self) -> bool:
        """Embeddings scaled by sqrt(d_model), a GeGLU MLP (gemma, gemma2, gemma3)."""
        return self.family in GEMMA_FAMILIES

    @property
    def post_norms(self) -> bool:
        """An RMSNorm on the attention's and the MLP's outputs too (gemma2, gemma3)."""
        return self.family in ("gemma2", "gemma3")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.dim_head) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to every earlier token)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def uses_rope(self) -> bool:
        return self.family != "gpt2"

    @property
    def uses_bias(self) -> bool:
        """Biases on every linear layer and norm (gpt2)."""
        return self.family == "gpt2"

    @property
    def has_qkv_bias(self) -> bool:
        if self.qkv_bias is not None:
            return self.qkv_bias
        return self.family in ("gpt2", "qwen2", "qwen2_moe")

    @property
    def vocab(self) -> int:
        if self.vocab_size is None:
            raise LmforgeError("model.vocab_size is not set: train a tokenizer first or set --model.vocab_size")
        return self.vocab_size


class TokenizerConfig(Section):
    vocab_size: int = 4096
    min_frequency: int = 2
    path: str | None = None  # reuse an existing tokenizer.json (or a model directory) instead of training


class DataConfig(Section):
    corpus: str = "shakespeare"  # a built-in corpus name, or a file, directory or glob
    text_field: str = "text"  # for JSONL inputs
    tokenizer: TokenizerConfig = TokenizerConfig()
    val_fraction: float = 0.05
    dir: str | None = None  # where prepared shards live; None: <run.out>/data/<corpus>-<vocab>

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in (0, 0.5)")
        return self


class TrainConfig(Section):
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup: int = 100
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    max_steps: int = 2000
    max_minutes: float | None = None  # stop early (with a checkpoint) after this much wall time
    weight_decay: float = 0.1
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float | None = None  # Muon's learning rate; None: train.lr (its updates are scaled to AdamW's size)
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 autocast on GPU and on CPUs with AVX512-BF16/AMX, else fp32
    compile: bool = False
    parallel: Literal["auto", "ddp", "fsdp", "tp", "fsdp+tp", "pp", "fsdp+pp"] = "auto"  # under torchrun; auto: ddp
    tp_size: int = 0  # tensor-parallel group size (tp, fsdp+tp); 0: every process for tp, 2 for fsdp+tp
    pp_size: int = 0  # pipeline stages (pp, fsdp+pp); 0: every process for pp, 2 for fsdp+pp
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    pp_microbatches: int = 0  # microbatches per pipeline step; 0: twice the stages
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    loss_chunk: int = 0  # tokens per loss chunk (lm_head + cross-entropy), so all logits never exist at once; 0: off
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # older step checkpoints are deleted; 0 keeps all
    log_every: int = 10
    early_stop_patience: int = 0  # stop after this many validations without improvement; 0: off
    early_stop_min_delta: float = 0.0  # an improvement is a validation loss lower than the best by more than this
    init_from: str | None = None  # a model directory to continue pretraining (its config, tokenizer, weights)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.early_stop_patience < 0 or self.early_stop_min_delta < 0:
            raise ValueError("early_stop_patience and early_stop_min_delta must be >= 0")
        if self.lr <= 0 or (self.muon_lr is not None and self.muon_lr <= 0):
            raise ValueError("lr and muon_lr must be positive")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError("muon_momentum must be in [0, 1)")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.tp_size < 0 or self.pp_size < 0 or self.pp_microbatches < 0:
            raise ValueError("tp_size, pp_size and pp_microbatches must be >= 0 (0 picks the default)")
        if self.loss_chunk < 0:
            raise ValueError("loss_chunk must be >= 0 (0 computes the loss in one piece)")
        return self


class EvalConfig(Section):
    every: int = 200  # validation every N steps (and at the end)
    batches: int = 20  # validation batches per evaluation


class RunSection(Section):
    name: str = "run"
    out: str = "runs"

    @property
    def dir(self) -> Path:
        return Path(self.out) / self.name


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    run: RunSection = RunSection()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def describe_validation_error(err: ValidationError, where: str, schema: type[BaseModel] | None = None) -> str:
    """One line naming each problem's dotted key, in words a user can act on. With the `schema`
    that was validated, an unknown key gets the nearest valid one (or the valid ones)."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key " + (_valid_keys(schema, e["loc"]) if schema else "(check the spelling)")
        problems.append(f"{key}: {msg}")
    return f"invalid {where}: " + "; ".join(problems)


def flag_problems(err: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line naming each problem by the command-line flag that set its field (`--lr must be
    positive`): a field's flag is `--` and its name in dashes unless `flags` spells it otherwise; a
    problem of the settings together (no field) is its message alone."""
    problems = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:
            problems.append(message)
            continue
        name = str(e["loc"][0])
        flag = "--" + (flags or {}).get(name, name.replace("_", "-"))
        # A validator's own message reads on from the flag; pydantic's ("Input should be ...") after a colon.
        problems.append(f"{flag} {message}" if e["type"] == "value_error" else f"{flag}: {message}")
    return "; ".join(problems)


def from_flags(schema: type[S], flags: Mapping[str, str] | None = None, /, **values: Any) -> S:
    """A command's options as a `schema`, or one LmforgeError naming each problem by its flag
    (see `flag_problems`)."""
    try:
        return schema(**values)
    except ValidationError as e:
        raise LmforgeError(flag_problems(e, flags)) from None


def _valid_keys(schema: type[BaseModel], loc: tuple) -> str:
    """'(did you mean train.lr?)' or '(train has: ...)' for the unknown key at `loc`."""
    import difflib
    import typing

    section: Any = schema
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        options = [field.annotation, *typing.get_args(field.annotation)] if field else []
        section = next((t for t in options if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is None:
            return "(check the spelling)"
    names = list(section.model_fields)
    parent = "".join(f"{p}." for p in loc[:-1])
    near = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if near:
        return f"(did you mean {parent}{near[0]}?)"
    return f"({parent.rstrip('.') or 'the top level'} has: {', '.join(names)})"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.lr 3e-4 --model.family=gpt2` -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise LmforgeError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise LmforgeError(f"override --{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LmforgeError(f"override --{key} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def builtin_recipes() -> dict[str, Path]:
    folder = Path(__file__).parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_recipe(source: str | Path | None, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe from a YAML path or a built-in name (e.g. `quickstart`), plus overrides."""
    return load_config(Recipe, source, overrides, kind="recipe", builtins=builtin_recipes())


# ----------------------------------------------------------------------------- reading any config

S = TypeVar("S", bound=BaseModel)


def find_config(source: str | Path, builtins: dict[str, Path], kind: str, accepts: str = "a YAML file") -> Path:
    """The YAML file `source` names: a path, or else the name of a built-in one."""
    path = Path(source)
    if not path.exists() and str(source) in builtins:
        path = builtins[str(source)]
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        named = f" or a built-in {kind} ({', '.join(builtins)})" if builtins else ""
        raise LmforgeError(f"{kind} {source} {problem}: give {accepts}{named}")
    return path


def read_yaml_mapping(path: Path, schema: type[BaseModel]) -> dict[str, Any]:
    """The mapping a YAML config file holds (an empty file holds {}), for `schema`'s keys."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LmforgeError(f"{path} is not valid YAML{at}: {what}") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    if not isinstance(raw, dict):
        keys = f" of the keys {', '.join(schema.model_fields)}" if schema.model_fields else ""
        raise LmforgeError(f"{path} must be a YAML mapping{keys}")
    return raw


def validated(schema: type[S], raw: dict[str, Any], where: str) -> S:
    """`raw` as a `schema`, or one LmforgeError naming every wrong key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise LmforgeError(describe_validation_error(e, where, schema)) from None


def load_config(schema: type[S], source: str | Path | None, overrides: list[str] | dict | None = None, *,
                kind: str, builtins: dict[str, Path], accepts: str = "a YAML file",
                defaults: dict[str, Any] | None = None,
                merge: Callable[[dict, dict], dict] | None = None,
                beside: Callable[[dict, Path], dict] | None = None) -> S:
    """The one way a YAML config is read: `defaults`, then the file `source` names (a path or a
    built-in name), then `overrides` (`--section.key value` flags or a nested dict), validated as
    `schema`. `merge` puts a layer over the one below (deep_merge unless a config says otherwise);
    `beside(raw, path)` lets a config resolve what its file names relative to itself. Every
    problem is one LmforgeError line naming the file and the keys."""
    merge = merge or deep_merge
    raw: dict[str, Any] = dict(defaults or {})
    where = kind
    if source is not None:
        path = find_config(source, builtins, kind, accepts)
        where = f"{kind} {path}"
        layer = read_yaml_mapping(path, schema)
        raw = merge(raw, beside(layer, path) if beside else layer)
    if overrides:
        raw = merge(raw, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return validated(schema, raw, where)
