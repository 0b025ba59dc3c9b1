"""Quantization: error bounds, the native kernels against a plain matmul, packed sizes,
reload and generation, GPTQ against round-to-nearest, and the user mistakes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from lmforge import native
from lmforge.compress import qlinear
from lmforge.compress.qlinear import (
    DynamicInt8Linear, QuantizedLinear, dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
    unpack_int4,
)
from lmforge.compress.quantize import gptq_codes, quantize_model, run_quantize
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir, weight_files


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


def test_int4_error_is_bounded_by_the_group_step():
    w = torch.randn(40, 256)
    packed, scale, zero = quantize_int4(w, 64)
    assert packed.shape == (40, 128) and packed.dtype == torch.uint8 and scale.shape == zero.shape == (40, 4)
    err = (dequantize_int4(packed, scale, zero, 64) - w).abs().reshape(40, 4, 64)
    assert bool((err <= scale[..., None] + 1e-6).all())  # one step at the clamped ends, half inside
    assert err.mean() < 0.3 * scale.mean()


def test_rounding_block_by_block_of_rows_gives_the_codes_of_the_whole_matrix(monkeypatch):
    """The quantizers round a few rows at a time (no full-size fp32 temporaries for a vocabulary-sized
    matrix); a block size that splits 37 rows unevenly must give the whole-matrix formula's codes."""
    from lmforge.compress import qlinear
    from lmforge.compress.quantize import symmetric_int4_grid

    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 4, 37)[:, None]
    scale8 = w.abs().amax(dim=1) / 127.0
    whole8 = torch.round(w / scale8[:, None]).clamp(-127, 127).to(torch.int8)
    scale4, zero4 = qlinear.int4_grid(w, 64)
    g = w.reshape(37, 4, 64)
    whole4 = (torch.round(g / scale4[..., None]) + zero4[..., None].float()).clamp(0, 15).reshape(37, 256)
    sym_scale = w.reshape(37, 4, 64).abs().amax(dim=-1) / 7.5
    monkeypatch.setattr(qlinear, "ROW_BLOCK_VALUES", 5 * 256 + 17)  # 5 rows a block: 7 full, one of 2
    assert len(qlinear.row_blocks(37, 256)) == 8
    q, scale = quantize_int8(w)
    assert torch.equal(scale, scale8) and torch.equal(q, whole8)
    assert torch.equal(qlinear.int4_codes(w, scale4, zero4, 64), whole4.to(torch.uint8))
    assert torch.equal(symmetric_int4_grid(w, 64)[0], sym_scale)


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (7, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 5, 40])
@pytest.mark.parametrize(("inputs", "group"), [(128, 64), (416, 32), (384, 128)])
def test_kernel_matches_matmul_on_the_dequantized_weight(bits, rows, inputs, group):
    # 416 = 13 blocks of 32 and 384 = 3 groups of 128: the wide (4-block) and narrow loops and their tails
    torch.manual_seed(0)
    linear = nn.Linear(inputs, 37)  # 37 outputs: odd
    layer = QuantizedLinear.from_float(linear, bits, group)
    x = torch.randn(2, rows, inputs)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    got = layer(x)
    assert got.shape == (2, rows, 37)
    # The decode kernel quantizes activations in blocks of 32: about 0.5% relative error.
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_many_rows_in_inference_share_one_dequantization_buffer_and_keep_their_outputs(monkeypatch):
    """Above DEQUANT_ROWS rows with autograd off, a layer the integer GEMM does not take (widths
    off its 64/128-column steps) dequantizes into one reused buffer: layers of different shapes in
    turn give what their own dequantized weights give, an earlier output is not changed by a later
    layer, and a weight above the cap takes its own allocation."""
    torch.manual_seed(0)
    layers = [QuantizedLinear.from_float(nn.Linear(k, n), bits, 32) for k, n, bits in
              [(224, 96, 8), (96, 300, 4), (224, 96, 4), (352, 40, 8)]]
    xs = [torch.randn(3, 9, layer.in_features) for layer in layers]  # 27 rows: the dequantized path
    expected = [F.linear(x, layer.dequantize(), layer.bias) for layer, x in zip(layers, xs)]
    with torch.no_grad():
        got = [layer(x) for layer, x in zip(layers, xs)]
        buffer = qlinear._reused.buffer
        assert buffer.numel() == max(layer.in_features * layer.out_features for layer in layers)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            assert g.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        monkeypatch.setattr(qlinear, "REUSED_BUFFER_MAX_BYTES", 4 * 96 * 224 - 1)
        torch.testing.assert_close(layers[0](xs[0]), expected[0], rtol=1e-5, atol=1e-5)
    # with autograd on, the weight the matmul saves for backward is the layer's own
    x = xs[1].clone().requires_grad_()
    layers[1](x).sum().backward()
    torch.testing.assert_close(x.grad, layers[1].dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_without_the_native_kernels_the_layer_falls_back_to_a_plain_matmul(monkeypatch):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(nn.Linear(64, 16), 4, 32)
    x = torch.randn(1, 64)
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
        assert torch.allclose(layer(x), F.linear(x, layer.dequantize(), layer.bias), atol=1e-5)
    finally:
        monkeypatch.delenv("LMFORGE_NATIVE")
        native.kernels.cache_clear()


def test_w8a8_is_close_to_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    y = DynamicInt8Linear.from_float(linear)(x)
    assert ((y - linear(x)).norm() / linear(x).norm()).item() < 0.05


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    K, N, G = 128, 64, 32
    mix = torch.randn(K, K) / K ** 0.5
    x = torch.randn(2048, K) @ mix + 0.1 * torch.randn(2048, K)  # correlated features, as real activations are
    w = torch.randn(N, K) * 0.05
    rtn = dequantize_int4(*quantize_int4(w, G), G)
    gptq = dequantize_int4(*gptq_codes(w, x.T @ x / len(x), G), G)
    err = lambda q: ((x @ (q - w).T).norm() / (x @ w.T).norm()).item()  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)


@pytest.fixture(scope="module")
def mid_model_dir(tokenizer, tmp_path_factory):
    """Large enough (2 x 256 wide) that the linears dominate the file, as in real models."""
    from lmforge.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                      d_model=256, d_ff=768, context=64)
    return save_model_dir(Transformer(cfg), tokenizer, tmp_path_factory.mktemp("mid") / "fp32")


def _size(path):
    return sum(p.stat().st_size for p in weight_files(path))


@pytest.mark.parametrize("method,low,high", [("int8", 3.5, 4.1), ("int4", 6.5, 8.1), ("w8a8", 3.5, 4.1)])
def test_packed_files_are_a_quarter_and_an_eighth(mid_model_dir, tmp_path, method, low, high):
    out = tmp_path / method
    run_quantize(mid_model_dir, method, out, group_size=128, log=lambda s: None, layout="lmforge")
    ratio = _size(mid_model_dir) / _size(out)
    assert low <= ratio <= high, ratio
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == method and config["quant_method"] == "lmforge"
    assert config["group_size"] == (128 if method == "int4" else None)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compressed_tensors_files_add_only_the_tied_embedding(mid_model_dir, tmp_path, method):
    """The default layout holds the same codes and scales (int4: symmetric, so no zero points); a tied model
    also stores its input embedding (the dequantized lm_head) in fp32, as transformers reads embeddings as floats."""
    run_quantize(mid_model_dir, method, tmp_path / "native", group_size=128, log=lambda s: None, layout="lmforge")
    run_quantize(mid_model_dir, method, tmp_path / "ct", group_size=128, log=lambda s: None)
    embedding = lmforge.load(mid_model_dir).model.tok_emb.weight
    native = lmforge.load(tmp_path / "native").model.state_dict()
    zero_points = sum(t.numel() for name, t in native.items() if name.endswith(".zeros"))
    expected = embedding.numel() * 4 - zero_points
    extra = _size(tmp_path / "ct") - _size(tmp_path / "native")
    assert abs(extra - expected) < 0.01 * expected, (extra, expected)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == (8 if method == "int8" else 4)


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8", "gptq"])
def test_quantized_model_reloads_and_generates(tiny_model_dir, tiny_data, tmp_path, method):
    ref = lmforge.load(tiny_model_dir)
    out = tmp_path / method
    run_quantize(tiny_model_dir, method, out, group_size=32, data=tiny_data, samples=32, log=lambda s: None)
    m = lmforge.load(out)
    assert type(m.model.lm_head).__name__ == ("DynamicInt8Linear" if method == "w8a8" else "QuantizedLinear")
    ids = torch.randint(0, ref.config.vocab, (2, 20))
    with torch.no_grad():
        base, got = ref.model(ids), m.model(ids)
    tolerance = {"int8": 0.03, "w8a8": 0.06, "int4": 0.3, "gptq": 0.3}[method]
    assert ((got - base).norm() / base.norm()).item() < tolerance
    # The same model in memory and reloaded from disk: identical logits.
    again = lmforge.load(out)
    with torch.no_grad():
        assert torch.equal(again.model(ids), got)
    (text,) = m.generate(["the"], max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str)
    assert m.generate(["the"], max_new_tokens=8) == again.generate(["the"], max_new_tokens=8)
    # A loaded quantized model saves as a quantized directory again, with the same logits.
    resaved = lmforge.load(m.save(tmp_path / f"{method}-resaved"))
    with torch.no_grad():
        assert torch.equal(resaved.model(ids), got)
    assert "quantization_config" in json.loads((tmp_path / f"{method}-resaved" / "config.json").read_text())


def test_group_size_that_does_not_divide_a_layer_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(LmforgeError, match="not divisible by the group size 128"):
        run_quantize(tiny_model_dir, "int4", tmp_path / "q", group_size=128, log=lambda s: None)
    with pytest.raises(LmforgeError, match="multiple of 32"):
        run_quantize(tiny_model_dir, "int4", tmp_path / "q", group_size=48, log=lambda s: None)
    assert not (tmp_path / "q").exists()


def test_quantizing_a_quantized_model_is_refused(tiny_model_dir, tmp_path):
    run_quantize(tiny_model_dir, "int8", tmp_path / "q8", log=lambda s: None)
    with pytest.raises(LmforgeError, match="already quantized"):
        run_quantize(tmp_path / "q8", "int4", tmp_path / "q4", group_size=32, log=lambda s: None)
    with pytest.raises(LmforgeError, match="already quantized"):
        quantize_model(lmforge.load(tmp_path / "q8").model, "int8")


def test_gptq_needs_enough_calibration_data(tiny_model_dir, tmp_path):
    with pytest.raises(LmforgeError, match="calibration data"):
        run_quantize(tiny_model_dir, "gptq", tmp_path / "q", group_size=32, log=lambda s: None)
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    with pytest.raises(LmforgeError, match="fewer than"):
        run_quantize(tiny_model_dir, "gptq", tmp_path / "q", group_size=32, data=short, log=lambda s: None)


def test_unknown_method_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(LmforgeError, match="unknown method"):
        run_quantize(tiny_model_dir, "int3", tmp_path / "q", log=lambda s: None)


def test_cli_quantize(cli, tiny_model_dir, tmp_path):
    r = cli("quantize", tiny_model_dir, "--method", "int8", "--out", tmp_path / "q8")
    assert r.returncode == 0, r.stderr
    assert "smaller" in r.stdout
    r = cli("generate", tmp_path / "q8", "--prompt", "the", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    # No --group-size: the default 128 does not divide the model's 32 inputs, so 32 is taken and said.
    r = cli("quantize", tiny_model_dir, "--method", "int4", "--out", tmp_path / "q4")
    assert r.returncode == 0, r.stderr
    assert "groups of 32" in r.stdout
    assert group_size_of(tmp_path / "q4") == 32
    # An explicit group size that does not fit stays an error.
    r = cli("quantize", tiny_model_dir, "--method", "int4", "--group-size", "128", "--out", tmp_path / "q4-128")
    assert r.returncode == 2 and "group size 128" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q4-128").exists()


def group_size_of(folder):
    """The int4 group size config.json records (compressed-tensors: its one weight scheme)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return config["config_groups"]["group_0"]["weights"]["group_size"]


@pytest.fixture(scope="module")
def quickstart_shaped_dir(tokenizer, tmp_path_factory):
    """The quickstart recipe's widths (d_model 192: 128 does not divide it, 64 does), one layer."""
    from lmforge.config import load_recipe

    torch.manual_seed(0)
    cfg = load_recipe("quickstart").model.model_copy(update={"vocab_size": tokenizer.vocab_size, "n_layer": 1})
    return save_model_dir(Transformer(cfg), tokenizer, tmp_path_factory.mktemp("qs") / "model")


@pytest.mark.parametrize("method", ["int4", "gptq"])
def test_without_a_group_size_the_largest_that_divides_every_layer_is_used(quickstart_shaped_dir, tiny_data,
                                                                           tmp_path, method):
    logs = []
    r = run_quantize(quickstart_shaped_dir, method, tmp_path / "q", data=tiny_data, samples=8, log=logs.append)
    assert r["group_size"] == 64
    assert group_size_of(tmp_path / "q") == 64
    assert any("groups of 64" in line and "128" in line for line in logs), logs
    assert lmforge.load(tmp_path / "q").model.blocks[0].mlp.down.group_size == 64


def test_a_model_whose_widths_no_group_size_divides_is_a_clear_error(tokenizer, tmp_path):
    from lmforge.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=3, n_kv_head=1,
                      d_model=48, context=32)  # 48 inputs: not a multiple of 32
    src = save_model_dir(Transformer(cfg), tokenizer, tmp_path / "fp32")
    with pytest.raises(LmforgeError, match="48 inputs, not a multiple of 32"):
        run_quantize(src, "int4", tmp_path / "q", log=lambda s: None)
    assert not (tmp_path / "q").exists()


def test_tied_lm_head_weight_is_the_embedding_and_not_stored_twice(tiny_model_dir, tmp_path):
    run_quantize(tiny_model_dir, "int4", tmp_path / "q", group_size=32, log=lambda s: None)
    m = lmforge.load(tmp_path / "q")
    assert m.model.lm_head.weight is m.model.tok_emb.weight
    assert torch.equal(m.model.lm_head.weight, m.model.lm_head.dequantize())
    assert "lm_head.tied" not in m.model.state_dict() and "tok_emb.weight" in m.model.state_dict()


def test_gradients_flow_to_the_input_of_a_quantized_layer():
    layer = QuantizedLinear.from_float(nn.Linear(64, 8), 8)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad[0], layer.dequantize().sum(0), atol=1e-5)


def test_writing_over_the_input_model_is_refused(tiny_model_dir):
    with pytest.raises(LmforgeError, match="the input model itself"):
        run_quantize(tiny_model_dir, "int8", tiny_model_dir, log=lambda s: None)
    assert lmforge.load(tiny_model_dir).meta.get("quantization") is None
