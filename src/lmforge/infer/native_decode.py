"""The fast path for decoding: one call into C (`lmforge/native/decode.c`) per step.

The PyTorch model stays the reference and does the prefill (compute-bound: MKL's matmuls
win there); once the prompts are in the KV cache, each step (one new token for each
sequence of the batch) goes through `decode_step`, which reads the model's own weight and
cache tensors in place (nothing is copied) for fp32, int8, int4 and w8a8 layers alike (except
the batches of a small quantized model, which run on fp32 copies: DEQUANTIZE_MAX_MIB); 2:4 layers
of `lmforge.compress.sparse` are packed once into their compact form for native/sparse.h. The
structs it passes are `lmforge.native.decode_abi`'s, checked against the compiled decode.h.
`NativeDecoder.create` returns None, with the reason in `why_not`, for anything the C side
does not cover, and callers then stay on the reference path: a LoRA-wrapped or
training-mode model with dropout, a bidirectional encoder, non-fp32 or non-CPU tensors, a
CPU without AVX2, no C compiler, LMFORGE_NATIVE=0, a build whose structs differ from the
mirror.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn as nn

from lmforge import native
from lmforge.compress.qlinear import CHUNK, DynamicInt8Linear, QuantizedLinear, matmul_bytes
from lmforge.compress.sparse_format import SPARSE_ATTR, is_two_four, pack_two_four_for_kernels
from lmforge.infer.lora_batch import LoraUpdate
from lmforge.model import Transformer
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import soft_cap
from lmforge.native import decode_abi as abi
from lmforge.native.decode_abi import F32, Q4, Q8, S24

# Below this much work (bytes of weights times sequences in the step) a step runs on one
# thread: for such a small step a second thread gains nothing measurable under a server's
# load (benchmarks/serve_load.py), and one thread leaves the other cores to the server.
PARALLEL_MIN_WORK = 32 << 20


# A step of this many rows or more of a small quantized model runs on fp32 copies of its
# dequantized weights, where the model's weights as fp32 take at most DEQUANTIZE_MAX_MIB for its
# kernels' instruction set and its weights' bits. Many rows make a step compute-bound; a model
# that small is read from the CPU's cache, where the bytes the integer kernels save cost little
# and their per-block work (unpacking, scaling, sign tricks) more than fp32's multiply-adds.
# Fewer rows read each weight once: there the integer kernels win at every size. The copies are
# small for the same reason. benchmarks/quant_decode_sizes.py measures the crossovers.
DEQUANTIZE_MIN_ROWS = 4
DEQUANTIZE_MAX_MIB = {("avx512-vnni", 8): 12, ("avx512-vnni", 4): 48,
                      ("avx512", 8): 96, ("avx512", 4): 96,  # no VNNI: row kernels, no tiles
                      ("avx2", 8): 0, ("avx2", 4): 12}

# decode.c sorts a row's chosen experts in a fixed-size array.
MAX_EXPERTS_PER_TOKEN = 16

# The phases decode.c times when profiling, in order.
PROFILE_PHASES = tuple(abi.PROFILE_PHASES.values())


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


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's linear weights as fp32, quantized or not."""
    return sum(4 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, (nn.Linear, QuantizedLinear, DynamicInt8Linear)))


def _quantized_bits(model: nn.Module) -> int:
    """The fewest bits of the model's quantized layers (0: none quantized)."""
    return min((m.bits for m in model.modules() if isinstance(m, (QuantizedLinear, DynamicInt8Linear))), default=0)


def dequantize_limit(model: nn.Module, lib: ctypes.CDLL) -> int:
    """Bytes of fp32 weights up to which `model`'s many-row steps run on fp32 copies with the
    kernels `lib` (see DEQUANTIZE_MAX_MIB); 0 for a model that is not quantized."""
    bits = _quantized_bits(model)
    return int(DEQUANTIZE_MAX_MIB.get((abi.isa(lib), bits), 0) * 2**20) if bits else 0


# Each quantized layer's fp32 copy, made on first use and kept while the layer lives; a change
# to its stored buffers (their version counters) makes a new one.
_DEQUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dequantized(m: QuantizedLinear | DynamicInt8Linear) -> torch.Tensor:
    if m.tied:  # a tied lm_head: the embedding holds exactly its dequantized weight
        return m.tied[0].detach()
    stamp = tuple((b.data_ptr(), b._version) for b in (m.qweight, m.scales, getattr(m, "zeros", None)) if b is not None)
    held = _DEQUANTIZED.get(m)
    if held is None or held[0] != stamp:
        held = _DEQUANTIZED[m] = (stamp, m.dequantize().contiguous())
    return held[1]


# Each 2:4 layer's compact form (values, indices), packed on first use and kept while the layer
# lives; a change to its weight (its version counter) packs it again.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _two_four(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The compact form of a layer loaded as 2:4 (`lmforge.compress.sparse`), or None where it is not
    (any more) 2:4 fp32."""
    w = m.weight.detach()
    if getattr(m, SPARSE_ATTR, None) != "2:4" or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    stamp = (w.data_ptr(), w._version)
    held = _PACKED.get(m)
    if held is None or held[0] != stamp:
        held = _PACKED[m] = (stamp, pack_two_four_for_kernels(w) if is_two_four(w) else None)
    return held[1]


def _linear(m: nn.Module, keep: list[torch.Tensor], dequantized: bool = False) -> abi.Linear:
    """The C description of one linear layer, pointing at the module's own buffers (a quantized
    one's fp32 copy where `dequantized`, a 2:4 one's compact form)."""
    packed = _two_four(m) if type(m) is nn.Linear else None
    if packed is not None:
        return abi.Linear(S24, m.out_features, m.in_features, 0, _tensor(packed[0], keep),
                          _tensor(m.weight.detach(), keep),  # the dense matrix, for AVX2's batches (sparse.h)
                          _tensor(packed[1], keep), _tensor(None if m.bias is None else m.bias.detach(), keep))
    if type(m) is nn.Linear:
        return abi.Linear(F32, m.out_features, m.in_features, 0, _tensor(m.weight.detach(), keep), None, None,
                          _tensor(None if m.bias is None else m.bias.detach(), keep))
    if dequantized and isinstance(m, (QuantizedLinear, DynamicInt8Linear)):
        return abi.Linear(F32, m.out_features, m.in_features, 0, _tensor(_dequantized(m), keep), None, None,
                          _tensor(m.bias, keep))
    if isinstance(m, (QuantizedLinear, DynamicInt8Linear)) and m.in_features % CHUNK == 0:
        kind = Q4 if m.bits == 4 else Q8
        zero = _tensor(m.zeros, keep) if kind == Q4 else None
        return abi.Linear(kind, m.out_features, m.in_features, getattr(m, "group_size", 0) or 0,
                          _tensor(m.qweight, keep), _tensor(m.scales, keep), zero, _tensor(m.bias, keep))
    raise Unsupported(f"{type(m).__name__} layers are not covered (merge adapters to decode natively)")


class NativeDecoder:
    """Decodes the sequences held in a KV cache: `keys[layer]` and `values[layer]` are each
    (rows, n_kv_head, capacity, head_dim), row r one sequence (a `KVCache` or `SlotCache`)."""

    def __init__(self, model: Transformer, keys: list[torch.Tensor], values: list[torch.Tensor], lib: ctypes.CDLL,
                 dequantize_max_bytes: int | None = None):
        """`dequantize_max_bytes`: the size up to which a quantized model's steps of
        DEQUANTIZE_MIN_ROWS rows or more run on fp32 copies of its weights (default:
        `dequantize_limit` for this model and these kernels; 0: the integer kernels always)."""
        cfg = model.config
        if not cfg.causal:
            raise Unsupported("a bidirectional encoder does not decode")
        if model.training and cfg.dropout > 0:
            raise Unsupported("the model is in training mode with dropout")
        if cfg.n_experts and cfg.experts_per_token > MAX_EXPERTS_PER_TOKEN:
            raise Unsupported(f"more than {MAX_EXPERTS_PER_TOKEN} experts per token")
        self.rows, _, self.capacity, _ = keys[0].shape
        self.row_stride = keys[0].stride(0)
        self.lib, self.vocab, self.logit_softcap = lib, cfg.vocab, cfg.logit_softcap
        # the C structs point into what _describe returns beside them: keep it alive
        self.spec, self._layers, self._held = self._describe(model, keys, values, dequantized=False)
        self.weight_bytes = matmul_bytes(model)
        limit = dequantize_limit(model, lib) if dequantize_max_bytes is None else dequantize_max_bytes
        self.dequantized = None  # (spec, layers, held) of the fp32 copies, for steps of many rows
        self.dequantized_bytes = fp32_bytes(model)
        if _quantized_bits(model) and self.dequantized_bytes <= limit:
            self.dequantized = self._describe(model, keys, values, dequantized=True)
        self.first: list[int] = [0] * self.rows  # leading padding slots per row (see for_cache)
        self._lora: list = []  # each layer's table of LoRA updates (set_adapters) and the tensors it points at

    def _describe(self, model: Transformer, keys: list[torch.Tensor], values: list[torch.Tensor],
                  dequantized: bool) -> tuple[abi.Model, ctypes.Array, list]:
        """The C description of the model (its quantized layers as fp32 copies where
        `dequantized`), its layer table, and what both point into."""
        cfg = model.config
        keep: list[torch.Tensor] = []
        t = lambda x: _tensor(None if x is None else x.detach(), keep)  # noqa: E731
        linear = lambda m: _linear(m, keep, dequantized)  # noqa: E731
        layers = (abi.Layer * cfg.n_layer)()
        experts = []  # each MoE layer's (up, down) pairs, which its Layer points into
        for i, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            norm = lambda n: None if n is None else t(n.weight)  # noqa: E731
            if cfg.n_experts:
                pairs = (abi.Linear * (2 * cfg.n_experts))(*(linear(layer) for expert in mlp.experts
                                                            for layer in (expert.up, expert.down)))
                experts.append(pairs)
                up, down, router, expert_ptr = abi.Linear(), abi.Linear(), linear(mlp.router), pairs
            else:
                up, down, router, expert_ptr = linear(mlp.up), linear(mlp.down), abi.Linear(), None
            shared = getattr(mlp, "shared", None)  # qwen2_moe's expert that every token runs
            shared_linears = (abi.Linear(),) * 3 if shared is None else \
                (linear(shared.up), linear(shared.down), linear(mlp.shared_gate))
            layers[i] = abi.Layer(t(block.norm1.weight), t(getattr(block.norm1, "bias", None)),
                                   t(block.norm2.weight), t(getattr(block.norm2, "bias", None)),
                                   linear(attn.qkv), linear(attn.proj), up, down,
                                   t(keys[i]), t(values[i]), norm(attn.q_norm), norm(attn.k_norm), router,
                                   None if expert_ptr is None else ctypes.addressof(expert_ptr), *shared_linears,
                                   *(norm(n) if cfg.post_norms else None for n in (block.post_attn_norm, block.post_mlp_norm)),
                                   *self._layer_rope(model, i, t), cfg.layer_window(i) or 0)
        spec = abi.Model(
            cfg.n_layer, cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dim_head,
            cfg.expert_dim if cfg.n_experts else cfg.ffn_dim, cfg.vocab,
            self.capacity, int(cfg.family == "gpt2"), int(cfg.family != "gpt2"), int(cfg.uses_rope),
            int(cfg.is_gemma), cfg.n_experts, cfg.experts_per_token, int(cfg.moe_norm_topk), cfg.moe_shared_d_ff or 0,
            cfg.norm_eps,
            cfg.d_model ** 0.5 if cfg.is_gemma else 1.0, cfg.attn_scale, cfg.attn_softcap or 0.0, t(model.tok_emb.weight),
            t(None if model.pos_emb is None else model.pos_emb.weight),
            t(getattr(model, "rope_cos", None)), t(getattr(model, "rope_sin", None)),
            t(model.norm_f.weight), t(getattr(model.norm_f, "bias", None)), linear(model.lm_head),
            ctypes.addressof(layers), 0, None)
        return spec, layers, [experts, keep]

    def _descriptions(self) -> list[tuple[abi.Model, ctypes.Array]]:
        return [(self.spec, self._layers)] + ([self.dequantized[:2]] if self.dequantized else [])

    def set_adapters(self, adapters: list[dict[str, LoraUpdate]]) -> None:
        """The LoRA adapters that `step`'s `adapters` index: adapters[i] maps a block linear's
        name (`blocks.0.attn.qkv`) to its update (`lmforge.infer.lora_batch.LoraUpdate`); linears
        it does not name it leaves alone."""
        keep: list[torch.Tensor] = []
        tables = []
        for i in range(self.spec.n_layer):
            table = (abi.Lora * (len(adapters) * len(abi.LORA_LINEARS)))()
            for a, adapter in enumerate(adapters):
                for j, linear in enumerate(abi.LORA_LINEARS):
                    u = adapter.get(f"blocks.{i}.{'attn' if linear in ('qkv', 'proj') else 'mlp'}.{linear}")
                    if u is not None:
                        table[a * len(abi.LORA_LINEARS) + j] = abi.Lora(u.r, len(u.cols), _tensor(u.a, keep),
                                                                        _tensor(u.bt, keep), _tensor(u.cols, keep))
            tables.append(table)
        for spec, layers in self._descriptions():
            for i, table in enumerate(tables):
                layers[i].lora = ctypes.addressof(table) if adapters else None
            spec.n_adapters = len(adapters)
        self._lora = [tables, keep]

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
        mismatches = abi.layout_mismatches(lib)
        if mismatches:
            raise Unsupported("decode.c's structs differ from their ctypes mirror in lmforge/native/decode_abi.py "
                              f"(the decoder would misread them): {'; '.join(mismatches)}")
        return cls(model, keys, values, lib)

    @classmethod
    def for_cache(cls, model: Transformer, cache: KVCache) -> "NativeDecoder | None":
        """A decoder for the batch in `cache` (prompts already in it, left padding included), or None."""
        decoder = cls.create(model, cache.k, cache.v)
        if decoder is not None and cache.has_padding:
            decoder.first = (~cache.valid[:, :cache.length]).sum(dim=1).tolist()
        return decoder

    def step(self, tokens: list[int], positions: list[int], slots: list[int] | None = None,
             cache_rows: list[int] | None = None, threads: int | None = None,
             logits_rows: list[int] | None = None, adapters: list[int] | None = None) -> torch.Tensor:
        """Feed tokens[b] at `positions[b]` to cache row `cache_rows[b]` (default: row b),
        writing its keys and values to slot `slots[b]` (default: the position; the sequence
        fills slots first..slots[b]-1 of its row); the logits (len(tokens), vocab).

        Rows that share a cache row are consecutive tokens of one sequence (a prompt fed in
        the same step as other sequences' next tokens): each attends to the ones before it.
        `threads` caps the OpenMP team (default: torch's threads, one below PARALLEL_MIN_WORK).
        `logits_rows` (increasing): only those rows' logits are computed and returned.
        `adapters[b]`: the LoRA adapter (an index into `set_adapters`' list) row b decodes with, -1 none."""
        B = len(tokens)
        slots = positions if slots is None else slots
        if B == 0 or (cache_rows is None and B > self.rows):
            raise ValueError(f"{B} sequences for a cache of {self.rows} rows")
        if cache_rows is not None and not all(0 <= r < self.rows for r in cache_rows):
            raise ValueError(f"a cache row outside 0..{self.rows - 1}")
        if max(slots) >= self.capacity:
            raise ValueError(f"KV cache full: slot {max(slots)} is past its capacity of {self.capacity} tokens")
        ints = ctypes.c_int * B
        first = self.first[:B] if cache_rows is None else [self.first[r] for r in cache_rows]
        token, pos, slot, first = ints(*tokens), ints(*positions), ints(*slots), ints(*first)
        cache_row = None if cache_rows is None else ints(*cache_rows)
        if logits_rows is not None and not (logits_rows and 0 <= logits_rows[0] and logits_rows[-1] < B
                                            and all(a < b for a, b in zip(logits_rows, logits_rows[1:]))):
            raise ValueError(f"logits_rows must be increasing row numbers in 0..{B - 1}")
        out_row = None if logits_rows is None else (ctypes.c_int * len(logits_rows))(*logits_rows)
        if adapters is not None and (len(adapters) != B or not all(-1 <= a < self.spec.n_adapters for a in adapters)):
            raise ValueError(f"adapters must give each of the {B} rows an adapter in 0..{self.spec.n_adapters - 1} or -1")
        adapter = None if adapters is None else ints(*adapters)
        rows = abi.Rows(B, ctypes.addressof(token), ctypes.addressof(pos), ctypes.addressof(slot),
                         ctypes.addressof(first), self.row_stride,
                         None if cache_row is None else ctypes.addressof(cache_row),
                         None if out_row is None else ctypes.addressof(out_row),
                         B if logits_rows is None else len(logits_rows),
                         None if adapter is None else ctypes.addressof(adapter))
        logits = torch.empty(B if logits_rows is None else len(logits_rows), self.vocab)
        spec, weight_bytes = self.spec, self.weight_bytes
        if self.dequantized is not None and B >= DEQUANTIZE_MIN_ROWS:
            spec, weight_bytes = self.dequantized[0], self.dequantized_bytes
        team = torch.get_num_threads() if weight_bytes * B >= PARALLEL_MIN_WORK else 1
        threads = team if threads is None else max(1, min(team, threads))
        self.lib.decode_step(ctypes.addressof(spec), ctypes.byref(rows), threads, logits.data_ptr())
        return soft_cap(logits, self.logit_softcap)

    @staticmethod
    def _layer_rope(model: Transformer, layer: int, t) -> tuple[int | None, int | None]:
        """The layer's own rotary table (gemma3's sliding layers), or (None, None): the model's."""
        cfg = model.config
        if cfg.rope_local_theta is None or cfg.layer_window(layer) is None:
            return None, None
        return t(model.rope_local_cos), t(model.rope_local_sin)

    def profile(self, steps) -> dict[str, float]:
        """Run `steps()` with the C side timing its phases; seconds per phase, in all."""
        seconds = torch.zeros(len(PROFILE_PHASES), dtype=torch.float64)
        for spec, _ in self._descriptions():
            spec.profile = seconds.data_ptr()
        try:
            steps()
        finally:
            for spec, _ in self._descriptions():
                spec.profile = None
        return dict(zip(PROFILE_PHASES, seconds.tolist()))


def step_cache(decoder: NativeDecoder, cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """`decoder.step` for the next slot of every row of a `KVCache`, keeping its bookkeeping."""
    slot = cache.length
    positions = [slot - first for first in decoder.first[:len(tokens)]]
    logits = decoder.step(tokens, positions, [slot] * len(tokens))
    cache.valid[:, slot] = True
    cache.advance(1)
    return logits


def why_not(model: Transformer, keys: list[torch.Tensor] | None = None) -> str | None:
    """Why `model` cannot decode natively, or None if it can."""
    if keys is None:
        cfg = model.config
        keys = [torch.zeros(1, cfg.kv_heads, 1, cfg.dim_head) for _ in range(cfg.n_layer)]
    try:
        NativeDecoder._create(model, keys, keys)
    except Unsupported as e:
        return str(e)
    return None
