"""The integer GEMM that quantized layers take for many rows in inference (native/qmatmul.c
`qgemm`), on every build this CPU runs: native (VNNI tiles on this project's AVX-512 machines)
and AVX2 forced with -march=haswell (vpmaddubsw tiles); AVX-512 without VNNI
(skylake-avx512) leaves many rows to the dequantized fp32 matmul. Shapes: odd row counts
(17, 33, 129: every remainder of the 4-row tiles, and more rows than one chunk of activations
when K is wide), N not a multiple of the weight tiles, K above one pass of 2048 columns, int4
groups of 32, 64, 128 and 256."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_native_kernels import reference_qlinear

from lmforge import native
from lmforge.compress import qlinear
from lmforge.compress.qlinear import QuantizedLinear

GEMM_BUILDS = ["native", "haswell"]


@pytest.fixture(params=GEMM_BUILDS)
def lib(request, use_kernels, monkeypatch):
    """The kernels of one build, the GEMM taken at every width it supports (narrow layers
    otherwise take the dequantized matmul: a speed choice, tested below)."""
    loaded = use_kernels(request.param)
    assert loaded.qgemm_supported(8, 2048, 0) and loaded.qgemm_supported(4, 2048, 128)
    monkeypatch.setattr(qlinear, "GEMM_MIN_IN_FEATURES", {8: 0, 4: 0})
    return loaded


def layer_and_rows(bits: int, K: int, N: int, group: int, M: int, seed: int):
    torch.manual_seed(seed)
    layer = QuantizedLinear.from_float(nn.Linear(K, N, bias=N % 2 == 1), bits, group)
    x = torch.randn(M, K) * torch.rand(M, 1) * 3  # rows of different magnitudes
    x[3, :32] = 0.0  # an all-zero block (scale 0)
    x[5, 64:96] *= 1000.0  # an outlier block
    return layer, x


# (bits, K, N, group): N 7/13/33/301 (not a multiple of 4, 3 or 2), K 2176 (two passes over K
# and, int8, two chunks of rows at 129), 1024 x 301 (enough work for the OpenMP threads), groups
# that divide the 128-column units and that span several
CASES = [(8, 64, 7, 0), (8, 320, 13, 0), (8, 2176, 33, 0), (8, 1024, 301, 0),
         (4, 128, 7, 32), (4, 384, 13, 64), (4, 640, 33, 128), (4, 2176, 13, 128), (4, 1024, 9, 256),
         (4, 1024, 301, 64)]


@pytest.mark.parametrize(("bits", "K", "N", "group"), CASES)
def test_the_gemm_gives_the_block_quantized_reference(lib, bits, K, N, group):
    layer, x = layer_and_rows(bits, K, N, group, 129, K + N + bits)
    for M in (17, 33, 129):
        with torch.no_grad():
            assert layer._kernel(lib, x[:M]) is lib.qgemm
            got = layer(x[:M].reshape(1, M, K))[0]
        want = reference_qlinear(x[:M], layer)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_the_gemm_stays_within_the_formats_error_of_the_fp32_layer(lib, bits):
    torch.manual_seed(5)
    linear = nn.Linear(1024, 96)
    x = torch.randn(40, 1024)
    with torch.no_grad():
        got = QuantizedLinear.from_float(linear, bits, 128)(x)
        want = linear(x)
        dequantized = F.linear(x, QuantizedLinear.from_float(linear, bits, 128).dequantize(), linear.bias)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got, want) < (0.01 if bits == 8 else 0.08)
    assert rel(got, dequantized) < 0.01  # the int8 activations' own error, small beside int4's


def test_the_builds_give_the_same_gemm(monkeypatch):
    """Integer products are exact in both builds and the activations quantize to the same
    bytes: the outputs agree to float rounding."""
    cases = [layer_and_rows(8, 384, 45, 0, 37, 1), layer_and_rows(4, 384, 45, 32, 37, 2),
             layer_and_rows(4, 512, 45, 256, 37, 3)]
    outputs = []
    for arch in GEMM_BUILDS:
        loaded = native.load(native.build(arch))
        monkeypatch.setattr(native, "kernels", lambda: loaded)
        with torch.no_grad():
            outputs.append([layer(x) for layer, x in cases])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_what_the_gemm_does_not_take_is_the_dequantized_matmul(lib):
    """Autograd on (the kernels have no backward), a width off the 64-column steps (int8) or
    the 128-column units (int4), a group that straddles the units: the layer's own dequantized
    weight, exactly."""
    torch.manual_seed(4)
    layers = [QuantizedLinear.from_float(nn.Linear(K, 21), bits, group)
              for K, bits, group in [(96, 8, 0), (192, 4, 64), (384, 4, 96)]]
    for layer in layers:
        x = torch.randn(20, layer.in_features)
        with torch.no_grad():
            assert layer._kernel(lib, x) is None
            got = layer(x)
        torch.testing.assert_close(got, F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
    layer, x = layer_and_rows(4, 256, 21, 128, 20, 5)
    x.requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_narrow_layers_take_the_dequantized_matmul_by_default(use_kernels):
    loaded = use_kernels("haswell")  # the GEMM on every AVX2 CPU
    for bits, group in ((8, 0), (4, 128)):
        narrow = qlinear.GEMM_MIN_IN_FEATURES[bits] // 2
        for K, kernel in ((narrow, None), (2 * narrow, loaded.qgemm)):
            layer, x = layer_and_rows(bits, K, 21, group, 40, 7)
            with torch.no_grad():
                assert layer._kernel(loaded, x) is kernel


def test_avx512_without_vnni_leaves_many_rows_to_the_fp32_matmul(use_kernels):
    loaded = use_kernels("skylake-avx512")
    assert not loaded.qgemm_supported(8, 2048, 0) and not loaded.qgemm_supported(4, 2048, 128)
    layer, x = layer_and_rows(8, 256, 21, 0, 20, 6)
    with torch.no_grad():
        assert layer._kernel(loaded, x) is None
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
