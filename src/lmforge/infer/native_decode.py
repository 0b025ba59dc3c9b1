"""The fast path for batch-1 decoding: one call into C (`lmforge/native/decode.c`) per token.

The PyTorch model stays the reference and does the prefill (compute-bound: MKL's matmuls
win there); once the prompt is in the KV cache, each new token goes through `decode_step`,
which reads the model's own weight and cache tensors in place (nothing is copied) for
fp32, int8, int4 and w8a8 layers alike. `NativeDecoder.create` returns None, with the
reason in `why_not`, for anything the C side does not cover, and callers then stay on
the reference path: a LoRA-wrapped or training-mode model with dropout, a bidirectional
encoder, non-fp32 or non-CPU tensors, a CPU without AVX2, no C compiler, LMFORGE_NATIVE=0.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int, c_void_p

import torch
import torch.nn as nn

from lmforge import native
from lmforge.compress.compare import matmul_bytes
from lmforge.compress.qlinear import CHUNK, DynamicInt8Linear, QuantizedLinear
from lmforge.model import Transformer
from lmforge.model.kv_cache import KVCache

F32, Q4, Q8 = 0, 4, 8
# Below this many bytes of weights a step takes microseconds, and its ~20 barriers per
# layer cost more than a second thread saves (far more on a busy machine, where each
# barrier waits for a descheduled thread): such models decode on one thread.
PARALLEL_MIN_BYTES = 4 << 20


class _Linear(ctypes.Structure):
    _fields_ = [("kind", c_int), ("N", c_int), ("K", c_int), ("G", c_int),
                ("w", c_void_p), ("scale", c_void_p), ("zero", c_void_p), ("bias", c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1_w", c_void_p), ("norm1_b", c_void_p), ("norm2_w", c_void_p), ("norm2_b", c_void_p),
                ("qkv", _Linear), ("proj", _Linear), ("up", _Linear), ("down", _Linear),
                ("k", c_void_p), ("v", c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [(name, c_int) for name in ("n_layer", "d_model", "n_head", "n_kv", "head_dim", "ffn", "vocab",
                                           "capacity", "window", "layernorm", "swiglu", "rope")] + [
        ("eps", c_float), ("tok_emb", c_void_p), ("pos_emb", c_void_p), ("rope_cos", c_void_p),
        ("rope_sin", c_void_p), ("norm_f_w", c_void_p), ("norm_f_b", c_void_p), ("lm_head", _Linear),
        ("layers", c_void_p), ("profile", c_void_p)]

# The phases decode.c times when profiling (its enum, in order).
PROFILE_PHASES = ("norm", "qkv matmul", "rope + cache write", "attention", "out-proj matmul", "up matmul",
                  "activation", "down matmul", "lm_head matmul")


class Unsupported(Exception):
    """Why a model cannot take the native path (the reference path then runs it)."""


def _tensor(t: torch.Tensor | None, keep: list[torch.Tensor]) -> int | None:
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise Unsupported("a tensor is not a contiguous CPU tensor")
    if t.is_floating_point() and t.dtype != torch.float32:
        raise Unsupported(f"weights are {t.dtype}, the native path runs fp32 and quantized models")
    keep.append(t)
    return t.data_ptr()


def _linear(m: nn.Module, keep: list[torch.Tensor]) -> _Linear:
    """The C description of one linear layer, pointing at the module's own buffers."""
    if type(m) is nn.Linear:
        return _Linear(F32, m.out_features, m.in_features, 0, _tensor(m.weight.detach(), keep), None, None,
                       _tensor(None if m.bias is None else m.bias.detach(), keep))
    if isinstance(m, (QuantizedLinear, DynamicInt8Linear)) and m.in_features % CHUNK == 0:
        kind = Q4 if m.bits == 4 else Q8
        zero = _tensor(m.zeros, keep) if kind == Q4 else None
        return _Linear(kind, m.out_features, m.in_features, getattr(m, "group_size", 0) or 0,
                       _tensor(m.qweight, keep), _tensor(m.scales, keep), zero, _tensor(m.bias, keep))
    raise Unsupported(f"{type(m).__name__} layers are not covered (merge adapters to decode natively)")


class NativeDecoder:
    """Decodes one sequence whose cache is `keys[layer]`, `values[layer]`, each
    (n_kv_head, capacity, head_dim): row 0 of a `KVCache` or one slot of a `SlotCache`."""

    def __init__(self, model: Transformer, keys: list[torch.Tensor], values: list[torch.Tensor], lib: ctypes.CDLL):
        cfg = model.config
        if not cfg.causal:
            raise Unsupported("a bidirectional encoder does not decode")
        if model.training and cfg.dropout > 0:
            raise Unsupported("the model is in training mode with dropout")
        keep: list[torch.Tensor] = []
        t = lambda x: _tensor(None if x is None else x.detach(), keep)  # noqa: E731
        layers = (_Layer * cfg.n_layer)()
        for i, block in enumerate(model.blocks):
            layers[i] = _Layer(t(block.norm1.weight), t(getattr(block.norm1, "bias", None)),
                               t(block.norm2.weight), t(getattr(block.norm2, "bias", None)),
                               _linear(block.attn.qkv, keep), _linear(block.attn.proj, keep),
                               _linear(block.mlp.up, keep), _linear(block.mlp.down, keep),
                               t(keys[i]), t(values[i]))
        self.capacity = keys[0].shape[1]
        self.spec = _Model(
            cfg.n_layer, cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dim_head, cfg.ffn_dim, cfg.vocab,
            self.capacity, cfg.sliding_window or 0, int(cfg.family == "gpt2"), int(cfg.family != "gpt2"),
            int(cfg.uses_rope), cfg.norm_eps, t(model.tok_emb.weight),
            t(None if model.pos_emb is None else model.pos_emb.weight),
            t(getattr(model, "rope_cos", None)), t(getattr(model, "rope_sin", None)),
            t(model.norm_f.weight), t(getattr(model.norm_f, "bias", None)), _linear(model.lm_head, keep),
            ctypes.addressof(layers), None)
        self._layers, self._keep = layers, keep  # the C struct points into these: keep them alive
        self.lib, self.vocab = lib, cfg.vocab
        self.parallel = matmul_bytes(model) >= PARALLEL_MIN_BYTES

    @classmethod
    def create(cls, model: Transformer, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "NativeDecoder | None":
        """A decoder, or None (see `why_not`) where only the reference path works."""
        try:
            return cls._create(model, keys, values)
        except Unsupported:
            return None

    @classmethod
    def _create(cls, model: Transformer, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "NativeDecoder":
        lib = native.kernels()
        if lib is None:
            raise Unsupported("the native kernels are not available (no C compiler, or LMFORGE_NATIVE=0)")
        if not lib.decode_supported():
            raise Unsupported("this CPU has no AVX2")
        return cls(model, keys, values, lib)

    @classmethod
    def for_cache(cls, model: Transformer, cache: KVCache) -> "NativeDecoder | None":
        """A decoder for the single unpadded sequence of `cache`, or None."""
        if cache.batch != 1 or cache.has_padding:
            return None
        return cls.create(model, [k[0] for k in cache.k], [v[0] for v in cache.v])

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Feed the token at position `pos` (slots 0..pos-1 hold the sequence so far) and
        write its keys and values to slot `pos`; its logits (1, vocab)."""
        if not 0 <= pos < self.capacity:
            raise ValueError(f"KV cache full: position {pos} is past its capacity of {self.capacity} tokens")
        logits = torch.empty(1, self.vocab)
        threads = torch.get_num_threads() if self.parallel else 1
        self.lib.decode_step(ctypes.addressof(self.spec), token, pos, threads, logits.data_ptr())
        return logits


    def profile(self, steps) -> dict[str, float]:
        """Run `steps()` with the C side timing its phases; seconds per phase, in all."""
        seconds = torch.zeros(len(PROFILE_PHASES), dtype=torch.float64)
        self.spec.profile = seconds.data_ptr()
        try:
            steps()
        finally:
            self.spec.profile = None
        return dict(zip(PROFILE_PHASES, seconds.tolist()))


def step_cache(decoder: NativeDecoder, cache: KVCache, token: int) -> torch.Tensor:
    """`decoder.step` on the next position of a batch-1 `KVCache`, keeping its bookkeeping."""
    pos = cache.length
    logits = decoder.step(token, pos)
    cache.valid[0, pos] = True
    cache.advance(1)
    return logits


def why_not(model: Transformer, keys: list[torch.Tensor] | None = None) -> str | None:
    """Why `model` cannot decode natively, or None if it can."""
    if keys is None:
        cfg = model.config
        keys = [torch.zeros(cfg.kv_heads, 1, cfg.dim_head) for _ in range(cfg.n_layer)]
    try:
        NativeDecoder._create(model, keys, keys)
    except Unsupported as e:
        return str(e)
    return None
