"""The int8/int4 kernels (native/kernels.h, qmatmul.c, the batched tiles of decode_avx512.h
and decode_avx2.h) against PyTorch references, on every build this CPU runs: the native one,
the AVX2 one forced with -march=haswell (LMFORGE_NATIVE_ARCH=haswell), whose vpmaddubsw
kernels an AVX-512 machine never runs by default, and AVX-512 without VNNI (skylake-avx512:
row kernels only, no tiles). Odd shapes: K that is not a multiple of 64 (an odd number of
blocks), N odd, batches 1 to 17 (every tile remainder); int4 groups of 32 (activations in
blocks in order), 64 and 128 (the row kernel's interleaved layouts)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import native
from lmforge.compress.qlinear import DEQUANT_ROWS, QuantizedLinear
from lmforge.compress.quantize import quantize_model
from lmforge.infer.native_decode import NativeDecoder, step_cache
from lmforge.native import decode_abi as abi

BUILDS = ["native", "haswell", "skylake-avx512"]


@pytest.fixture(scope="module", params=BUILDS)
def build(request) -> str:
    return request.param


@pytest.fixture
def lib(build, use_kernels, monkeypatch):
    """The kernels built for `build`, in place of the default ones for this test."""
    loaded = use_kernels(build)
    # the integer kernels at every batch size (a small model's batches otherwise run on fp32 copies)
    monkeypatch.setattr("lmforge.infer.native_decode.DEQUANTIZE_MAX_MIB", {})
    return loaded


def test_the_forced_avx2_build_is_the_avx2_variant(lib, build):
    if build == "haswell":
        assert abi.isa(lib) == "avx2"
    elif build == "skylake-avx512":
        assert abi.isa(lib) == "avx512"
    else:
        assert abi.isa(lib) in ("avx2", "avx512", "avx512-vnni")


def reference_qlinear(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized to int8 symmetrically per block of 32
    (round half to even), times the dequantized weight, plus the bias."""
    M, K = x.shape
    blocks = x.double().reshape(M, K // 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True).float() / 127.0  # fp32, as the kernel divides
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x.reshape(M, K // 32, 32) * inv)  # fp32 product, as the kernel multiplies
    xq = (q.double() * d.double()).reshape(M, K)
    y = xq @ layer.dequantize().double().T
    return (y if layer.bias is None else y + layer.bias.double()).float()


# (K, N, group): one block; an odd number of blocks (K = 96, 224); groups of 32/64/128.
SHAPES = [(32, 7, 32), (96, 33, 32), (224, 17, 32), (320, 9, 64), (768, 5, 128)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("K", "N", "group"), SHAPES)
def test_qlinear_gives_the_block_quantized_reference(lib, bits, K, N, group):
    torch.manual_seed(K + N + bits)
    linear = nn.Linear(K, N, bias=N % 2 == 1)
    layer = QuantizedLinear.from_float(linear, bits, group)
    x = torch.randn(17, K) * torch.rand(17, 1) * 3  # rows of different magnitudes
    x[3, :32] = 0.0  # an all-zero block (scale 0)
    for M in range(1, 18):  # every remainder of the 4-row tiles; 17 rows take the BLAS path
        got = layer(x[:M])
        want = reference_qlinear(x[:M], layer) if M <= 16 else F.linear(x[:M], layer.dequantize(), layer.bias)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_qlinear_stays_within_the_formats_error_of_the_fp32_layer(lib, bits):
    torch.manual_seed(5)
    linear = nn.Linear(512, 96)
    x = torch.randn(3, 512)
    got = QuantizedLinear.from_float(linear, bits, 64)(x)
    want = linear(x).detach()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.08), rel


def test_an_input_width_off_the_32_block_falls_back_to_the_dequantized_matmul(lib):
    torch.manual_seed(6)
    layer = QuantizedLinear.from_float(nn.Linear(200, 11), 8)
    x = torch.randn(2, 200)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)


def test_the_builds_agree(monkeypatch):
    """The int8 products are exact integers in every build (vpdpbusd or vpmaddubsw + vpmaddwd),
    and the activations quantize to the same bytes: the outputs agree to float rounding."""
    torch.manual_seed(7)
    layers = [QuantizedLinear.from_float(nn.Linear(352, 45), bits, 32) for bits in (8, 4)]
    layers += [QuantizedLinear.from_float(nn.Linear(384, 45), 4, group) for group in (64, 128)]
    x = torch.randn(5, 384)
    outputs = []
    for arch in BUILDS:
        loaded = native.load(native.build(arch))
        monkeypatch.setattr(native, "kernels", lambda: loaded)
        outputs.append([layer(x[:m, :layer.in_features]) for layer in layers for m in (1, 5)])
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def inputs(batch: int, vocab: int, steps: int = 5) -> torch.Tensor:
    """The tokens fed to `batch` sequences, one a step: (steps, batch)."""
    return torch.randint(1, vocab, (steps, batch), generator=torch.Generator().manual_seed(batch))


@torch.inference_mode()
def decode_logits(model, tokens: torch.Tensor, native_path: bool) -> torch.Tensor:
    """Logits (steps, batch, vocab) for feeding `tokens` one step at a time from an empty cache,
    on either path (so that every matmul sees `batch` rows)."""
    cache = model.new_cache(tokens.shape[1])
    decoder = NativeDecoder.for_cache(model, cache) if native_path else None
    out = []
    for step in tokens:
        if native_path:
            out.append(step_cache(decoder, cache, step.tolist()))
        else:
            out.append(model(step[:, None], cache, last_only=True)[:, -1])
    return torch.stack(out)


def dequantized(base, model):
    """`base` with each quantized layer's dequantized weight: the format's error, no activation quantization."""
    exact = copy.deepcopy(base)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            exact.get_submodule(name).weight.data.copy_(module.dequantize())
    return exact


@pytest.mark.slow
@pytest.mark.parametrize(("method", "group"), [("int8", 32), ("int4", 32)])
def test_the_batched_tiles_give_the_reference_logits_for_every_batch_size(make_model, lib, method, group):
    # d_model 96 (3 blocks: an odd block count), ffn 160 (5 blocks), vocab 331 (N odd)
    base = make_model("llama", vocab_size=331, d_model=96, n_head=4, n_kv_head=2, d_ff=160, context=32,
                      init_std=0.1)
    model = quantize_model(copy.deepcopy(base), method, group, log=lambda *a: None)
    exact = dequantized(base, model)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for batch in (1, 2, 3, 4, 5, 7, 8, 13, 16, 17):
        tokens = inputs(batch, 331)
        got = decode_logits(model, tokens, native_path=True)
        # a tile computes each (row, sequence) the same way wherever the sequence sits in the
        # batch: each sequence decoded beside copies of itself (batch 4 and up take the tiles
        # on every build, fewer may take the row kernels) gives its logits in the batch
        copies = 4 if batch >= 4 else 1
        alone = torch.cat([decode_logits(model, tokens[:, [b] * copies], True)[:, :1] for b in range(batch)], 1)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5 * alone.abs().max().item())
        # against the fp32 model with the dequantized weights: the activations' int8 adds no
        # more error than it does on the reference path (which takes them to int8 alike up to
        # 16 rows and multiplies the dequantized weight in fp32 above)
        ref = decode_logits(model, tokens, native_path=False)
        want = decode_logits(exact, tokens, native_path=False)
        assert rel(got, want) < (0.03 if method == "int8" else 0.1), batch
        if batch <= DEQUANT_ROWS:
            assert rel(got, want) <= max(1.5 * rel(ref, want), 0.01), batch


@pytest.mark.parametrize(("group", "d_model", "vocab"), [(64, 256, 331), (128, 256, 331), (128, 512, 32000)])
def test_batch_one_int4_decode_stays_within_the_reference_paths_error(make_model, lib, group, d_model, vocab):
    """At batch 1 the AVX2 and AVX-512-without-VNNI builds decode int4 with the row kernel, which
    reads the activations interleaved by 64 or 128 columns; the VNNI build takes its tiles for the
    smallest models and the row kernel above 8 MiB of int4 weights (512 x 32000 vocabulary: 9.1 MiB).
    The logits are as close to the fp32 model with the dequantized weights as the reference
    path's, which quantizes the activations the same way (one rounding that differs in an early
    layer moves the logits of a random model by ~2%, so not equal ones)."""
    base = make_model("llama", vocab_size=vocab, d_model=d_model, n_head=4, n_kv_head=2, d_ff=384, context=32,
                      init_std=0.1)
    model = quantize_model(copy.deepcopy(base), "int4", group, log=lambda *a: None)
    tokens = inputs(1, vocab, steps=4)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    want = decode_logits(dequantized(base, model), tokens, native_path=False)
    got = decode_logits(model, tokens, native_path=True)
    # the reference path's one-row matmuls run the same row kernel: a bound of its own as well
    assert rel(got, want) <= min(1.5 * rel(decode_logits(model, tokens, native_path=False), want), 0.05)
