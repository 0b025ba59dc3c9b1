"""decode.h against its ctypes mirror (lmforge/native/decode_abi.py): the compiled library's
layout is the mirror's, and a mirror that differs from it in any field, in any way, is named
field by field and keeps the decoder off (the reference path then decodes)."""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int, c_long

import pytest

from lmforge import native
from lmforge.infer.generate import generate_ids
from lmforge.infer.native_decode import NativeDecoder, why_not
from lmforge.infer.sampling import SamplingParams
from lmforge.native import decode_abi as abi


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    lib = native.kernels()
    assert lib is not None, "the native kernels did not build"
    return lib


def wrong(name: str, fields: list[tuple]) -> type[ctypes.Structure]:
    """A ctypes struct called `name` (so it stands for decode.h's struct of that name)."""
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def swap(structs: tuple, replacement: type[ctypes.Structure]) -> tuple:
    return tuple(replacement if s.__name__ == replacement.__name__ else s for s in structs)


LINEAR = abi.Linear._fields_
ROWS = abi.Rows._fields_
MODEL = abi.Model._fields_


def test_the_compiled_layout_is_the_mirrors_for_every_field_and_constant(lib):
    c = abi.c_layout(lib)
    assert abi.layout_mismatches(lib) == []
    assert c == abi.mirror_layout()
    # Every field of the five structs is reported, with its offset and size, and the constants.
    fields = sum(len(s._fields_) for s in abi.STRUCTS)
    assert len(c) == len(abi.STRUCTS) + 2 * fields + len(abi.CONSTANTS) == 5 + 2 * (8 + 5 + 23 + 30 + 10) + 21
    assert c["sizeof(Linear)"] == 48 and c["offsetof(Rows, row_stride)"] == 40 and c["sizeof(Rows.row_stride)"] == 8
    assert c["offsetof(Layer, proj)"] == 32 + 48 and c["Q8"] == 8 and c["S24"] == 2 and c["PROFILE_PHASES"] == 11


def test_a_field_of_another_type_is_named_with_both_sizes_and_the_offsets_it_moves(lib):
    # An int where decode.h has a long: padding keeps the later offsets, the size tells.
    rows = wrong("Rows", [(n, c_int if n == "row_stride" else t) for n, t in ROWS])
    assert abi.layout_mismatches(lib, swap(abi.STRUCTS, rows)) == [
        "sizeof(Rows.row_stride): 8 in decode.h, 4 in the ctypes mirror"]
    # A long where decode.h has an int: every field after it moves.
    linear = wrong("Linear", [(n, c_long if n == "kind" else t) for n, t in LINEAR])
    found = abi.layout_mismatches(lib, swap(abi.STRUCTS, linear))
    assert found[:4] == ["sizeof(Linear): 48 in decode.h, 56 in the ctypes mirror",
                         "sizeof(Linear.kind): 4 in decode.h, 8 in the ctypes mirror",
                         "offsetof(Linear, N): 4 in decode.h, 8 in the ctypes mirror",
                         "offsetof(Linear, K): 8 in decode.h, 12 in the ctypes mirror"]
    assert "offsetof(Linear, bias): 40 in decode.h, 48 in the ctypes mirror" in found


def test_two_fields_of_one_type_in_the_wrong_order_are_named(lib):
    order = [LINEAR[0], LINEAR[2], LINEAR[1], *LINEAR[3:]]  # K before N: the same sizes, the same struct size
    found = abi.layout_mismatches(lib, swap(abi.STRUCTS, wrong("Linear", order)))
    assert found == ["offsetof(Linear, N): 4 in decode.h, 8 in the ctypes mirror",
                     "offsetof(Linear, K): 8 in decode.h, 4 in the ctypes mirror"]


def test_a_field_missing_from_either_side_is_named(lib):
    found = abi.layout_mismatches(lib, swap(abi.STRUCTS, wrong("Model", MODEL[:-1])))
    assert found == ["sizeof(Model): 200 in decode.h, 192 in the ctypes mirror",
                     "offsetof(Model, profile): 192 in decode.h, missing from the ctypes mirror",
                     "sizeof(Model.profile): 8 in decode.h, missing from the ctypes mirror"]
    extra = wrong("Model", [*MODEL, ("temperature", c_float)])
    found = abi.layout_mismatches(lib, swap(abi.STRUCTS, extra))
    assert found == ["sizeof(Model): 200 in decode.h, 208 in the ctypes mirror",
                     "offsetof(Model, temperature): 200 in the ctypes mirror, missing from decode.h",
                     "sizeof(Model.temperature): 4 in the ctypes mirror, missing from decode.h"]


def test_constants_that_differ_are_named(lib):
    phases = list(abi.PROFILE_PHASES)
    phases[1], phases[2] = phases[2], phases[1]
    constants = {**abi.CONSTANTS, "Q4": 5, **{name: i for i, name in enumerate(phases)}}
    assert abi.layout_mismatches(lib, constants=constants) == [
        "Q4: 4 in decode.h, 5 in the ctypes mirror",
        "P_QKV: 1 in decode.h, 2 in the ctypes mirror",
        "P_ROPE_CACHE: 2 in decode.h, 1 in the ctypes mirror",
    ]


def test_a_mismatched_mirror_keeps_the_decoder_off_and_says_which_field(make_model, monkeypatch):
    model = make_model("llama", init_std=0.1)
    expected, _ = generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8), eos_id=None, native=False)
    rows = wrong("Rows", [(n, c_int if n == "row_stride" else t) for n, t in ROWS])
    monkeypatch.setattr(abi, "STRUCTS", swap(abi.STRUCTS, rows))
    reason = why_not(model)
    assert reason.startswith("decode.c's structs differ from their ctypes mirror in lmforge/native/decode_abi.py")
    assert "sizeof(Rows.row_stride): 8 in decode.h, 4 in the ctypes mirror" in reason
    cache = model.new_cache(1)
    assert NativeDecoder.create(model, cache.k, cache.v) is None
    got, _ = generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8), eos_id=None, native=True)
    assert got == expected
    monkeypatch.undo()
    assert why_not(model) is None



def test_kernels_that_fail_to_build_are_said_once_not_hidden(tmp_path, monkeypatch, capsys):
    from lmforge import native

    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'broken cc 1.0'; exit 0; fi\n"
                      "echo 'decode.c:1:1: error: something is wrong' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    assert native.build("native", cc=str(broken)) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not build" in err[0] and "error: something is wrong" in err[0]
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind
