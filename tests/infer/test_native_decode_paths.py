"""Which weights the native decoder reads for a quantized model: steps of many rows of a small
model run on fp32 copies of the dequantized weights (infer.native_decode.DEQUANTIZE_MAX_MIB),
everything else on the integer kernels. The copies are the quantized weights, so their logits
are the dequantized model's; the kernels quantize activations too, so theirs are near, not equal."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge import native
from lmforge.compress.quantize import quantize_model
from lmforge.config import ModelConfig
from lmforge.infer import native_decode
from lmforge.infer.native_decode import (DEQUANTIZE_MIN_ROWS, NativeDecoder, dequantize_limit, fp32_bytes,
                                         step_cache)
from lmforge.model import Transformer

VOCAB = 331


def quantized_pair(make_model, method: str, **config) -> tuple[Transformer, Transformer]:
    """(a quantized model, the fp32 model holding exactly its dequantized weights)."""
    base = make_model("llama", vocab_size=VOCAB, d_model=96, n_head=4, n_kv_head=2, d_ff=160, context=32,
                      init_std=0.1, **config)
    model = quantize_model(copy.deepcopy(base), method, 32, log=lambda *a: None)
    exact = copy.deepcopy(base)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            exact.get_submodule(name).weight.data.copy_(module.dequantize())
    return model, exact


@torch.inference_mode()
def native_logits(model: Transformer, batch: int, max_bytes: int | None = None) -> tuple[torch.Tensor, NativeDecoder]:
    """Logits (steps, batch, vocab) of the native decoder fed 5 tokens a row from an empty cache."""
    tokens = torch.randint(1, VOCAB, (5, batch), generator=torch.Generator().manual_seed(batch))
    cache = model.new_cache(batch)
    decoder = NativeDecoder(model, cache.k, cache.v, native.kernels(), max_bytes)
    return torch.stack([step_cache(decoder, cache, step.tolist()) for step in tokens]), decoder


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_steps_on_the_fp32_copies_give_the_dequantized_models_logits(make_model, method, tied):
    model, exact = quantized_pair(make_model, method, tie_embeddings=tied)
    want, _ = native_logits(exact, 6)
    got, decoder = native_logits(model, 6, max_bytes=1 << 30)
    assert decoder.dequantized is not None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    # Fewer rows than DEQUANTIZE_MIN_ROWS take the integer kernels, activations quantized to
    # int8 per block: within the format's error of the same logits, and not equal to them.
    few = DEQUANTIZE_MIN_ROWS - 1
    kernels, _ = native_logits(model, few, max_bytes=1 << 30)
    want_few, _ = native_logits(exact, few)
    assert 1e-5 < rel(kernels, want_few) < (0.03 if method != "int4" else 0.1)


def test_without_the_copies_a_batch_takes_the_integer_kernels(make_model):
    model, exact = quantized_pair(make_model, "int8")
    want, _ = native_logits(exact, 6)
    got, decoder = native_logits(model, 6, max_bytes=0)
    assert decoder.dequantized is None
    assert 1e-5 < rel(got, want) < 0.03


def test_the_copies_follow_a_change_to_the_stored_weights(make_model):
    model, _ = quantized_pair(make_model, "int8")
    before, _ = native_logits(model, 6, max_bytes=1 << 30)
    with torch.no_grad():
        model.blocks[0].mlp.down.scales.mul_(2.0)  # a new version of the buffer: a new copy
    after, _ = native_logits(model, 6, max_bytes=1 << 30)
    assert rel(after, before) > 1e-3


def shape(n_layer: int, d_model: int, n_head: int, n_kv_head: int, vocab: int) -> Transformer:
    """A model of a benchmark's shape (benchmarks/quant_decode_sizes.py) on the meta device:
    sizes without the memory."""
    with torch.device("meta"):
        return Transformer(ModelConfig(family="llama", vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                       n_kv_head=n_kv_head, d_model=d_model, context=256))


def quantized_shape(method: str, *dims: int) -> Transformer:
    from lmforge.compress.qlinear import QuantizedLinear

    model = shape(*dims)
    bits = 4 if method == "int4" else 8
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, leaf = name.rpartition(".")
            with torch.device("meta"):
                layer = QuantizedLinear(module.in_features, module.out_features, bits, 32)
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    return model


@pytest.mark.parametrize(("isa", "method", "dims", "copies"), [
    # the quickstart's model (7.5 MiB as fp32), 6x256 (20.9 MiB), 8x384 (60 MiB), 12x768 (382 MiB)
    ("avx512-vnni", "int8", (4, 192, 6, 2, 2048), True),
    ("avx512-vnni", "int8", (6, 256, 8, 4, 4096), False),
    ("avx512-vnni", "int4", (6, 256, 8, 4, 4096), True),
    ("avx512-vnni", "int4", (12, 768, 12, 4, 32000), False),
    ("avx512", "int8", (8, 384, 6, 2, 8192), True),
    ("avx512", "int4", (12, 768, 12, 4, 32000), False),
    ("avx2", "int8", (4, 192, 6, 2, 2048), False),
    ("avx2", "int4", (4, 192, 6, 2, 2048), True),
    ("avx2", "int4", (6, 256, 8, 4, 4096), False),
])
def test_the_rule_picks_the_copies_for_small_models_by_instruction_set_and_format(isa, method, dims, copies,
                                                                                  monkeypatch):
    monkeypatch.setattr(native_decode.abi, "isa", lambda lib: isa)  # kernels built for that instruction set
    model = quantized_shape(method, *dims)
    assert (fp32_bytes(model) <= dequantize_limit(model, None)) == copies
    assert dequantize_limit(shape(*dims), None) == 0  # an fp32 model has nothing to copy
