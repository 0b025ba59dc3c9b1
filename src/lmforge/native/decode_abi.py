"""decode.h's structs and constants as ctypes sees them, and the check that the two agree.

ctypes cannot read a C header, so the structs are written out again here, field for field.
`layout_mismatches` compares them with the layout the compiled library reports
(decode.c's `decode_layout`: every struct's size, every field's offset and size, every
constant): a field added, moved or retyped on one side only is named, and
`lmforge.infer.native_decode` then leaves the decoder unused rather than pass it structs
it would misread.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_float, c_int, c_long, c_void_p

F32, S24, Q4, Q8 = 0, 2, 4, 8  # Linear.kind (S24: 2:4 sparse fp32, native/sparse.h)


class Linear(ctypes.Structure):
    _fields_ = [("kind", c_int), ("N", c_int), ("K", c_int), ("G", c_int),
                ("w", c_void_p), ("scale", c_void_p), ("zero", c_void_p), ("bias", c_void_p)]


class Lora(ctypes.Structure):
    _fields_ = [("rank", c_int), ("slices", c_int), ("a", c_void_p), ("bt", c_void_p), ("cols", c_void_p)]


LORA_LINEARS = ("qkv", "proj", "up", "down")  # a Layer's lora table: this order per adapter (decode.h's LORA_*)


class Layer(ctypes.Structure):
    _fields_ = [("norm1_w", c_void_p), ("norm1_b", c_void_p), ("norm2_w", c_void_p), ("norm2_b", c_void_p),
                ("qkv", Linear), ("proj", Linear), ("up", Linear), ("down", Linear),
                ("k", c_void_p), ("v", c_void_p), ("q_norm", c_void_p), ("k_norm", c_void_p),
                ("router", Linear), ("experts", c_void_p), ("shared_up", Linear), ("shared_down", Linear),
                ("shared_gate", Linear), ("post_attn_w", c_void_p), ("post_mlp_w", c_void_p),
                ("rope_cos", c_void_p), ("rope_sin", c_void_p), ("window", c_int), ("lora", c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(name, c_int) for name in ("n_layer", "d_model", "n_head", "n_kv", "head_dim", "ffn", "vocab",
                                           "capacity", "layernorm", "swiglu", "rope", "gelu_gate", "n_experts",
                                           "top_k", "norm_topk", "shared_ffn")] + [
        ("eps", c_float), ("embed_scale", c_float), ("attn_scale", c_float), ("attn_softcap", c_float),
        ("tok_emb", c_void_p), ("pos_emb", c_void_p), ("rope_cos", c_void_p),
        ("rope_sin", c_void_p), ("norm_f_w", c_void_p), ("norm_f_b", c_void_p), ("lm_head", Linear),
        ("layers", c_void_p), ("n_adapters", c_int), ("profile", c_void_p)]


class Rows(ctypes.Structure):
    _fields_ = [("B", c_int), ("token", c_void_p), ("pos", c_void_p), ("slot", c_void_p), ("first", c_void_p),
                ("row_stride", c_long), ("cache_row", c_void_p), ("out_row", c_void_p), ("n_out", c_int),
                ("adapter", c_void_p)]


# decode.h's profiling phases, in the order of its enum: what each is called in reports.
PROFILE_PHASES = {"P_NORM": "norm", "P_QKV": "qkv matmul", "P_ROPE_CACHE": "rope + cache write",
                  "P_ATTENTION": "attention", "P_PROJ": "out-proj matmul", "P_UP": "up matmul",
                  "P_ACTIVATION": "activation", "P_DOWN": "down matmul", "P_LM_HEAD": "lm_head matmul",
                  "P_ROUTE": "expert routing", "P_LORA": "LoRA adapters"}

STRUCTS: tuple[type[ctypes.Structure], ...] = (Linear, Lora, Layer, Model, Rows)  # each named as in decode.h
CONSTANTS: dict[str, int] = {"F32": F32, "S24": S24, "Q4": Q4, "Q8": Q8, **{name: i for i, name in enumerate(PROFILE_PHASES)},
                             "PROFILE_PHASES": len(PROFILE_PHASES),
                             **{f"LORA_{name.upper()}": i for i, name in enumerate(LORA_LINEARS)},
                             "LORA_LINEARS": len(LORA_LINEARS)}


def mirror_layout(structs: tuple[type[ctypes.Structure], ...] | None = None,
                  constants: dict[str, int] | None = None) -> dict[str, int]:
    """The ctypes side's layout (STRUCTS and CONSTANTS unless given), in `decode_layout`'s terms."""
    layout: dict[str, int] = {}
    for struct in STRUCTS if structs is None else structs:
        name = struct.__name__
        layout[f"sizeof({name})"] = ctypes.sizeof(struct)
        for field, *_ in struct._fields_:
            layout[f"offsetof({name}, {field})"] = getattr(struct, field).offset
            layout[f"sizeof({name}.{field})"] = getattr(struct, field).size
    return layout | (CONSTANTS if constants is None else constants)


@functools.cache  # a loaded library's layout does not change
def c_layout(lib: ctypes.CDLL) -> dict[str, int]:
    """The layout the compiled decode.c reports."""
    fn = lib.decode_layout
    fn.argtypes, fn.restype = [ctypes.c_char_p, c_int], c_int
    size = fn(None, 0) + 1
    text = ctypes.create_string_buffer(size)
    fn(text, size)
    return {name: int(value) for name, value in (line.rsplit(" ", 1) for line in text.value.decode().splitlines())}


def layout_mismatches(lib: ctypes.CDLL, structs: tuple[type[ctypes.Structure], ...] | None = None,
                      constants: dict[str, int] | None = None) -> list[str]:
    """Where the ctypes mirror differs from the compiled decode.h, one line each; [] when they agree."""
    ours, theirs = mirror_layout(structs, constants), c_layout(lib)
    problems = []
    for key in [*theirs, *(key for key in ours if key not in theirs)]:  # decode.h's order first
        if key not in ours:
            problems.append(f"{key}: {theirs[key]} in decode.h, missing from the ctypes mirror")
        elif key not in theirs:
            problems.append(f"{key}: {ours[key]} in the ctypes mirror, missing from decode.h")
        elif ours[key] != theirs[key]:
            problems.append(f"{key}: {theirs[key]} in decode.h, {ours[key]} in the ctypes mirror")
    return problems


def isa(lib: ctypes.CDLL) -> str:
    """The instruction set the library decodes with: "avx512-vnni", "avx512", "avx2" or "none"."""
    fn = lib.decode_isa
    fn.argtypes, fn.restype = [], ctypes.c_char_p
    return fn().decode()
