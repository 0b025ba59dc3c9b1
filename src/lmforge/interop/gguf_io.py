"""GGUF for llama.cpp, written and read through the `gguf` package.

Export: each family maps onto a llama.cpp architecture (gpt2, llama, qwen2, phi3; mistral
becomes llama, whose llama.cpp graph has no sliding window). Tensors take the names
`gguf.TensorNameMap` gives, in the layouts llama.cpp's own converter produces: the
llama architecture's q/k rows permuted for its interleaved RoPE, GPT-2 weights as
(out, in), Llama-3 RoPE scaling as a `rope_freqs` tensor. 1-D tensors stay f32; 2-D ones
take the requested type (f32, f16, q8_0, q4_0), or f16 where a row is not a multiple of
the 32-value quantization block. The byte-level BPE tokenizer goes in as
`tokenizer.ggml.*` (tokens, token types, merges, special ids, pre-tokenizer name) with
the chat template. The exact lmforge config rides along as `lmforge.config` so an import
restores the family; GGUF files from elsewhere are read from the llama.cpp keys alone.

Import dequantizes every tensor to f32 (or the requested dtype).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import split_rule, weight_map
from lmforge.model import Transformer
from lmforge.model.transformer import rope_attention_factor, rope_frequencies

ARCH = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3", "qwen3": "qwen3",
        "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe",
        "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
FAMILY = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
          "qwen2moe": "qwen2_moe"}
# One expert's projection in Hugging Face's checkpoints; llama.cpp stacks a layer's experts
# into one (n_experts, rows, cols) tensor per projection, named as the name without the number.
EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\.(\w+)\.weight$")
TYPES = ("f32", "f16", "q8_0", "q4_0", "q6_k", "q4_k_m")
CONFIG_KEY = "lmforge.config"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF needs the gguf package: pip install 'lmforge[gguf]'") from None
    return gguf


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split RoPE rows -> llama.cpp's interleaved pairs (llama.cpp's own converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layout(name: str, t: torch.Tensor, cfg: ModelConfig, to_gguf: bool) -> torch.Tensor:
    """What differs between a Hugging Face tensor and its llama.cpp counterpart."""
    if cfg.family == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return t.t().contiguous()
    if ARCH[cfg.family] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.n_head if name.endswith("q_proj.weight") else cfg.kv_heads
        return (permute_qk if to_gguf else unpermute_qk)(t, heads).contiguous()
    if cfg.is_gemma and name.endswith("norm.weight"):  # llama.cpp's Gemma norms hold 1 + w, as ours do
        return t + 1 if to_gguf else t - 1
    return t


# Which layers llama.cpp's gemma2/gemma3 graphs make sliding: every `period`-th from the
# first is full (gemma2: 2 -> even layers slide; gemma3: 6 -> all but 5, 11, ...).
GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}


def _llama_cpp_gap(cfg: ModelConfig) -> str | None:
    """What of a Gemma config llama.cpp would compute differently (it fixes these in its graph), or None."""
    if not cfg.is_gemma:
        return None
    if cfg.family in ("gemma", "gemma2") and not cfg.tie_embeddings:
        return f"llama.cpp's {cfg.family} has no separate output matrix (untied embeddings)"
    if cfg.query_pre_attn_scalar not in (None, cfg.dim_head):
        return f"llama.cpp scales {cfg.family} attention by 1/sqrt(head_dim), not 1/sqrt(query_pre_attn_scalar)"
    if cfg.rope_scaling is not None:
        return f"RoPE scaling on {cfg.family} does not travel to llama.cpp"
    if cfg.family == "gemma2" and (cfg.attn_softcap is None or cfg.logit_softcap is None):
        return "llama.cpp's gemma2 always soft-caps scores and logits (50 and 30 where the file gives none)"
    if cfg.family == "gemma3" and (cfg.rope_local_theta or 10000.0) != 10000.0:
        return "llama.cpp's gemma3 uses a rope base of 10000 for its sliding layers"
    period = GEMMA_SWA_PERIOD.get(cfg.family)
    if period is not None and cfg.sliding_window is not None:
        fixed = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(cfg.n_layer)]
        if [cfg.layer_window(i) is not None for i in range(cfg.n_layer)] != [t == "sliding_attention" for t in fixed]:
            return f"llama.cpp's {cfg.family} makes every {period}th layer full attention, the rest sliding"
    return None


def _moe_gap(cfg: ModelConfig) -> str | None:
    """What of a mixture-of-experts config llama.cpp's graphs would compute differently, or None."""
    if cfg.family == "mixtral" and cfg.expert_dim != cfg.ffn_dim:
        return "llama.cpp's llama architecture sizes its experts by feed_forward_length (moe_d_ff must be d_ff)"
    if cfg.family == "qwen3_moe" and not cfg.moe_norm_topk:
        return "llama.cpp's qwen3moe always renormalizes the chosen experts' weights (norm_topk_prob true)"
    if cfg.family == "qwen2_moe" and cfg.moe_norm_topk:
        return "llama.cpp's qwen2moe never renormalizes the chosen experts' weights (norm_topk_prob false)"
    return None


def _add_yarn(writer, cfg: ModelConfig) -> None:
    """YaRN as llama.cpp's rope reads it. Its graph scales cos/sin by attn_factor * (1 + 0.1 ln factor),
    so attn_factor carries only what transformers' attention factor differs from that by."""
    gguf = _gguf()
    s = cfg.rope_scaling
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(s.factor)
    writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
    writer.add_rope_scaling_yarn_beta_fast(s.beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(s.beta_slow)
    implied = 1.0 + 0.1 * math.log(s.factor) if s.factor > 1 else 1.0
    if not math.isclose(rope_attention_factor(cfg), implied, rel_tol=1e-6):
        writer.add_rope_scaling_attn_factors(rope_attention_factor(cfg) / implied)


def _read_yarn(field) -> RopeScaling | None:
    """The YaRN scaling a foreign GGUF's rope.scaling keys describe (None: no scaling)."""
    kind = field("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "yarn":
        raise LmforgeError(f"GGUF rope scaling {kind!r} is not supported (yarn only)")
    factor = field("rope.scaling.factor")
    implied = 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0
    attn = field("rope.scaling.attn_factor")
    return RopeScaling(rope_type="yarn", factor=factor,
                       original_max_position_embeddings=field("rope.scaling.original_context_length"),
                       beta_fast=field("rope.scaling.yarn_beta_fast") or 32.0,
                       beta_slow=field("rope.scaling.yarn_beta_slow") or 1.0,
                       attention_factor=None if attn is None else attn * implied)


def stack_experts(tensors, n_experts: int):
    """(name, tensor) pairs with each layer's per-expert projections stacked as llama.cpp
    keeps them: (n_experts, rows, cols) under the name without the expert's number."""
    pending: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors:
        m = EXPERT.match(name)
        if m is None:
            yield name, t
            continue
        stacked = f"{m[1]}.{m[3]}.weight"
        pending.setdefault(stacked, []).append(t)
        if len(pending[stacked]) == n_experts:  # the rules list a layer's experts in order
            yield stacked, torch.stack(pending.pop(stacked))


class Blocks:
    """A quantized layer's own codes already laid out as GGUF blocks (rows of bytes) of `kind`."""

    def __init__(self, data: torch.Tensor, kind: str):
        self.data, self.kind = data, kind


def _code_blocks(layer, qtype: str, cfg: ModelConfig) -> Blocks | None:
    """lmforge's int8 codes as Q8_0, its symmetric int4 codes as Q4_0 (None: requantize instead)."""
    from lmforge.interop import gguf_quants

    if getattr(layer, "qweight", None) is None or cfg.family == "gpt2" or cfg.n_experts:
        return None  # gpt2's Conv1D weights are transposed for llama.cpp: codes cannot move rows to columns
    if qtype == "q8_0" and layer.bits == 8:
        return Blocks(torch.from_numpy(gguf_quants.q8_0_from_codes(layer.qweight.numpy(), layer.scales.numpy())),
                      "q8_0")
    if qtype == "q4_0" and layer.bits == 4 and bool((layer.zeros == 8).all()):
        return Blocks(torch.from_numpy(gguf_quants.q4_0_from_codes(layer.qweight.numpy(), layer.scales.numpy(),
                                                                   layer.group_size)), "q4_0")
    return None


def quantized_export_note(model: Transformer, qtype: str) -> str | None:
    """What a GGUF export of a quantized model does with its codes (None: not quantized)."""
    q = getattr(model, "quantization", None)
    if not q:
        return None
    kept = {("int8", "q8_0"), ("w8a8", "q8_0"), ("int4", "q4_0")}
    if (q.get("method"), qtype) in kept and (q["method"] != "int4" or q.get("symmetric")) \
            and model.config.family != "gpt2":
        return (f"{q['method']} codes kept as {qtype} blocks (scales rounded to fp16); "
                "the tied embedding and 1-D tensors are written as for any model")
    return (f"{q['method']} ({'symmetric' if q.get('symmetric') else 'asymmetric'}) codes do not map onto {qtype}: "
            f"requantized from the dequantized weights (int8 keeps its codes in q8_0; symmetric int4, "
            f"as `lmforge quantize` writes by default, in q4_0)")


def _hf_tensors(model: Transformer, qtype: str = "f32"):
    """(Hugging Face name, f32 tensor or Blocks) pairs, one of our tensors at a time."""
    state = model.state_dict()
    for rule in weight_map(model.config):
        module = rule.ours.rpartition(".")[0]
        layer = model.get_submodule(module) if rule.ours.endswith(".weight") and rule.ours not in state else None
        if layer is None:
            yield from split_rule(rule, state[rule.ours].detach().float().cpu()).items()
            continue
        blocks = _code_blocks(layer, qtype, model.config)
        if blocks is None:
            yield from split_rule(rule, layer.dequantize().detach().float().cpu()).items()
        else:
            yield from ((name, Blocks(part, blocks.kind)) for name, part in split_rule(rule, blocks.data).items())


def _tensor_kind(qtype: str, gguf_name: str, shape: tuple[int, ...], n_layer: int) -> str:
    """The GGUF type of one tensor: 1-D ones f32; k-quants where rows are whole super-blocks of 256
    (else the fallback llama.cpp uses: q5_0 for q4_K, q8_0 for q6_K); f16 where a row is not whole
    32-value blocks."""
    from lmforge.interop.gguf_quants import QK_K, q4_k_m_type

    if len(shape) < 2:
        return "f32"
    kind = q4_k_m_type(gguf_name, n_layer) if qtype == "q4_k_m" else qtype
    if kind in ("q4_k", "q6_k") and shape[-1] % QK_K:
        kind = {"q4_k": "q5_0", "q6_k": "q8_0"}[kind]
    if kind not in ("f32", "f16") and shape[-1] % 32:
        kind = "f16"
    return kind


def _encode(data: np.ndarray, kind: str):
    """(array for GGUFWriter.add_tensor, raw_dtype or None)."""
    gguf = _gguf()
    from lmforge.interop.gguf_quants import quantize_q4_k, quantize_q6_k

    if kind == "f32":
        return np.asarray(data, dtype=np.float32), None  # the model's own tensor where it is f32 already
    if kind == "f16":
        return data.astype(np.float16), None
    ggml = gguf.GGMLQuantizationType[kind.upper()]
    own = {"q4_k": quantize_q4_k, "q6_k": quantize_q6_k}.get(kind)
    if own is None:
        return gguf.quants.quantize(data, ggml), ggml
    rows = data.reshape(-1, data.shape[-1])
    return own(rows).reshape(*data.shape[:-1], -1), ggml


def _pre_tokenizer_name(tokenizer: TextTokenizer) -> str:
    """llama.cpp picks its pre-tokenizer regex by name."""
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\\\p{N}" in text:
        return "qwen2"
    return "default"


def _add_tokenizer(writer, tokenizer: TextTokenizer, vocab: int) -> None:
    gguf = _gguf()
    model = json.loads(tokenizer.backend.to_str()).get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')}")
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    id_to_token = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(vocab):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:  # SpecialVocab reads merges and special ids from files
        tokenizer.save(d)
        gguf.SpecialVocab(d, load_merges=True, n_vocab=vocab).add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(False)


def _add_hparams(writer, cfg: ModelConfig) -> None:
    writer.add_context_length(cfg.context)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab)
    if cfg.family == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.dim_head)
    writer.add_key_length(cfg.dim_head)
    writer.add_value_length(cfg.dim_head)
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "yarn":
        _add_yarn(writer, cfg)
    if cfg.sliding_window is not None and cfg.family == "phi3":
        writer.add_sliding_window(cfg.sliding_window)
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
        if cfg.family in ("qwen3_moe", "qwen2_moe"):
            writer.add_expert_feed_forward_length(cfg.expert_dim)
        if cfg.moe_shared_d_ff:
            writer.add_expert_shared_feed_forward_length(cfg.moe_shared_d_ff)
    if cfg.post_norms:  # gemma2, gemma3
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
            writer.add_sliding_window_pattern([cfg.layer_window(i) is not None for i in range(cfg.n_layer)])
        if cfg.attn_softcap is not None:
            writer.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.logit_softcap is not None:
            writer.add_final_logit_softcapping(cfg.logit_softcap)
        if cfg.rope_local_theta is not None:
            writer.add_rope_freq_base_swa(cfg.rope_local_theta)


BLOCKS = "blocks:"  # the kind of a tensor that is a quantized layer's own codes, already in GGUF blocks


def _gguf_tensors(model: Transformer, qtype: str, names):
    """(GGUF name, numpy array in llama.cpp's layout, kind) of every tensor, made one at a time
    (a layer's experts at once): kind is the GGUF type to encode it as, or BLOCKS + the type of
    a quantized layer's codes already laid out as that type's blocks."""
    cfg = model.config
    extra = []
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":
        base = rope_frequencies(cfg.model_copy(update={"rope_scaling": None}))
        extra.append(("rope_freqs.weight", base / rope_frequencies(cfg)))
    for hf_name, t in itertools.chain(stack_experts(_hf_tensors(model, qtype), cfg.n_experts), extra):
        name = "rope_freqs.weight" if hf_name == "rope_freqs.weight" else \
            names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"no GGUF name for {hf_name}")  # a gap in the family tables: a bug
        if isinstance(t, Blocks):
            yield name, _layout(hf_name, t.data, cfg, to_gguf=True).numpy(), BLOCKS + t.kind
            continue
        data = _layout(hf_name, t, cfg, to_gguf=True).numpy()
        yield name, data, _tensor_kind(qtype, name, data.shape, cfg.n_layer)


def _encoded_info(data: np.ndarray, kind: str) -> tuple:
    """(shape, dtype, bytes, raw GGML type or None) of `data` once `_encode`d as `kind`: what
    GGUFWriter.add_tensor_info takes, known before the tensor is encoded."""
    gguf = _gguf()
    if kind.startswith(BLOCKS):
        return data.shape, np.uint8, data.nbytes, gguf.GGMLQuantizationType[kind.removeprefix(BLOCKS).upper()]
    if kind in ("f32", "f16"):
        dtype = np.dtype(np.float32 if kind == "f32" else np.float16)
        return data.shape, dtype, data.size * dtype.itemsize, None
    ggml = gguf.GGMLQuantizationType[kind.upper()]
    shape = gguf.quant_shape_to_byte_shape(data.shape, ggml)
    return shape, np.uint8, math.prod(shape), ggml


def export_gguf(loaded, out: str | Path, qtype: str = "f16", log=print) -> Path:
    gguf = _gguf()
    if qtype not in TYPES:
        raise LmforgeError(f"--gguf-type {qtype!r} is not one of {', '.join(TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise LmforgeError(f"--out {out} should end in .gguf")
    cfg: ModelConfig = loaded.config
    linear = cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear"
    gap = _llama_cpp_gap(cfg) or _moe_gap(cfg) or ("its linear RoPE scaling is not written to GGUF" if linear else None)
    if gap is not None:
        raise LmforgeError(f"GGUF export of this {cfg.family} model would not run the same in llama.cpp: {gap}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
    note = quantized_export_note(loaded.model, qtype)
    if note:
        log(f"quantized model: {note}")
    arch = ARCH[cfg.family]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        # No general.name: llama.cpp keys tokenizer fixes on it (a name with "phi3" in it makes it
        # demand Phi-3's own special tokens, and fail to load without them).
        writer.add_file_type(file_type[qtype])
        _add_hparams(writer, cfg)
        writer.add_string(CONFIG_KEY, json.dumps(cfg.model_dump(mode="json")))
        _add_tokenizer(writer, loaded.tokenizer, cfg.vocab)
        # Two passes over the tensors, each made one at a time: the first lists their names, types
        # and sizes (the header precedes the data), the second encodes and writes each, so the
        # export never holds more than one converted tensor (a layer's experts) beside the model.
        for name, data, kind in _gguf_tensors(loaded.model, qtype, names):
            writer.add_tensor_info(name, *_encoded_info(data, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, data, kind in _gguf_tensors(loaded.model, qtype, names):
            writer.write_tensor_data(data if kind.startswith(BLOCKS) else _encode(data, kind)[0])
        writer.close()
        partial.replace(out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out


# ----------------------------------------------------------------------------- import

def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def _config(reader, arch: str, tensor_names: set[str]) -> ModelConfig:
    stored = _field(reader, CONFIG_KEY)
    if stored is not None:
        return ModelConfig.model_validate(json.loads(stored))
    if arch not in FAMILY:
        raise LmforgeError(f"GGUF architecture {arch!r} is not supported: lmforge reads {', '.join(FAMILY)}")
    if "rope_freqs.weight" in tensor_names:
        raise LmforgeError("this GGUF uses per-frequency RoPE factors (rope_freqs) that lmforge cannot map back")

    def key(name: str, default=None):
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise LmforgeError(f"GGUF metadata lacks {arch}.{name}")
        return value

    d_model, n_head = key("embedding_length"), key("attention.head_count")
    common = dict(family=FAMILY[arch], vocab_size=_vocab_size(reader, arch), n_layer=key("block_count"),
                  n_head=n_head, d_model=d_model, d_ff=key("feed_forward_length"), context=key("context_length"),
                  tie_embeddings="output.weight" not in tensor_names)
    if arch == "gpt2":
        return ModelConfig(**common, norm_eps=key("attention.layer_norm_epsilon"))
    experts = _field(reader, f"{arch}.expert_count") or 0
    if experts:
        if arch == "llama":
            common["family"] = "mixtral"
        common.update(n_experts=experts, experts_per_token=key("expert_used_count"),
                      moe_d_ff=_field(reader, f"{arch}.expert_feed_forward_length"), moe_norm_topk=arch != "qwen2moe",
                      moe_shared_d_ff=_field(reader, f"{arch}.expert_shared_feed_forward_length"))
    return ModelConfig(**common, n_kv_head=key("attention.head_count_kv", n_head),
                       head_dim=key("attention.key_length", d_model // n_head),
                       norm_eps=key("attention.layer_norm_rms_epsilon"), rope_theta=key("rope.freq_base", 10000.0),
                       rope_scaling=_read_yarn(lambda name: _field(reader, f"{arch}.{name}")),
                       qkv_bias=arch in ("qwen2", "qwen2moe") or None,
                       sliding_window=_field(reader, f"{arch}.attention.sliding_window") if arch == "phi3" else None)


def _vocab_size(reader, arch: str) -> int:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 0)


PRE_TOKENIZER_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _tokenizer(reader) -> TextTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    gguf = _gguf()
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise LmforgeError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE, 'gpt2', only)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] not in (gguf.TokenType.UNUSED,)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre in PRE_TOKENIZER_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL])

    def token(key: str):
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"eos_token": token("tokenizer.ggml.eos_token_id"), "bos_token": token("tokenizer.ggml.bos_token_id"),
              "pad_token": token("tokenizer.ggml.padding_token_id"),
              "chat_template": _field(reader, "tokenizer.chat_template")}
    return TextTokenizer(tok, {k: v for k, v in config.items() if v is not None})


def read_gguf(path: Path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, TypeError, struct.error) as e:
        raise LmforgeError(f"{path} is not a readable GGUF file ({str(e)[:160]})") from None


def load_gguf(path: Path, dtype: torch.dtype | None = None) -> tuple[Transformer, TextTokenizer]:
    """A GGUF file as a model and tokenizer. The file is untrusted input: whatever its parsing
    raises becomes one LmforgeError naming the file."""
    from pydantic import ValidationError

    try:
        return _load_gguf(path, dtype)
    except LmforgeError:
        raise
    except ValidationError as e:
        raise LmforgeError(f"{path}: its config is invalid ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # numpy, struct, json, tokenizers: a damaged file can trip any of them
        raise LmforgeError(f"{path} is corrupt or not a GGUF lmforge can read ({type(e).__name__}: "
                           f"{str(e)[:160]})") from None


def _load_gguf(path: Path, dtype: torch.dtype | None = None) -> tuple[Transformer, TextTokenizer]:
    from lmforge.interop.weights import MemoryTensors, load_weights

    gguf = _gguf()
    reader = read_gguf(path)
    arch = _field(reader, "general.architecture")
    gguf_tensors = {t.name: t for t in reader.tensors}
    cfg = _config(reader, arch, set(gguf_tensors))
    if ARCH[cfg.family] != arch:
        raise LmforgeError(f"{path}: {CONFIG_KEY} says {cfg.family} but the architecture is {arch}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    hf: dict[str, torch.Tensor] = {}
    used = set()
    stacked: dict[str, np.ndarray] = {}  # a layer's experts, dequantized once for all of them
    for rule in weight_map(cfg):
        for hf_name in rule.theirs:
            expert = EXPERT.match(hf_name)
            name = names.get_name(f"{expert[1]}.{expert[3]}.weight" if expert else hf_name,
                                  try_suffixes=(".weight", ".bias"))
            if name not in gguf_tensors:
                raise LmforgeError(f"{path}: tensor {name} ({hf_name}) is missing")
            if name not in stacked:
                t = gguf_tensors[name]
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                try:
                    data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                except (ValueError, NotImplementedError) as e:
                    raise LmforgeError(f"{path}: tensor {name} cannot be dequantized ({e})") from None
                if not expert:
                    hf[hf_name] = _layout(hf_name, torch.from_numpy(np.array(data, dtype=np.float32)), cfg,
                                          to_gguf=False)
                    used.add(name)
                    continue
                stacked[name] = data
            if int(expert[2]) >= stacked[name].shape[0]:
                raise LmforgeError(f"{path}: tensor {name} has {stacked[name].shape[0]} experts, the config "
                                   f"{cfg.n_experts}")
            hf[hf_name] = torch.from_numpy(np.array(stacked[name][int(expert[2])], dtype=np.float32))
            used.add(name)
    extra = sorted(set(gguf_tensors) - used - {"rope_freqs.weight"})
    if extra:
        raise LmforgeError(f"{path}: tensor {extra[0]} is not used by a {cfg.family} model of this config")
    model = load_weights(MemoryTensors(hf, str(path)), cfg, dtype or torch.float32)
    return model, _tokenizer(reader)
