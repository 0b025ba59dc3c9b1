"""The 2:4 kernel (native/sparse.h) in the native decoder, on the native build and the AVX2
one forced with -march=haswell: a 2:4 model decodes from its compact form to the logits of
the same dense pruned model on the PyTorch path, for input widths with and without a tail
(K not a multiple of 32 or 64), at batch 1 and 3 (the row kernel), 5 (AVX-512: rows expanded into
the dense tiles; AVX2: rows) and 6 (AVX2: the layer's dense matrix), also where the rows are no
whole number of tiles; a layer that is no longer 2:4 is decoded dense."""

from __future__ import annotations


import pytest
import torch

import lmforge
from lmforge.compress.prune import prune_mask, prune_model, run_prune
from lmforge.compress.sparse import mark_two_four
from lmforge.compress.sparse_format import SPARSE_ATTR
from lmforge.infer.native_decode import NativeDecoder
from lmforge.native import decode_abi as abi
from test_native_kernels import decode_logits, inputs

BUILDS = ["native", "haswell"]


@pytest.fixture(params=BUILDS)
def lib(request, use_kernels):
    loaded = use_kernels(request.param)
    if request.param == "haswell":
        assert abi.isa(loaded) == "avx2"
    return loaded


def two_four_model(make_model, d_model: int, d_ff: int):
    model = make_model("llama", vocab_size=211, d_model=d_model, n_head=4, n_kv_head=2, d_ff=d_ff, context=32,
                       init_std=0.1)
    prune_model(model, 0.5, "magnitude", "2:4")
    mark_two_four(model)
    return model


def kinds(model) -> list[int]:
    cache = model.new_cache(1)
    decoder = NativeDecoder.for_cache(model, cache)
    layer = decoder._layers[0]
    return [layer.qkv.kind, layer.proj.kind, layer.up.kind, layer.down.kind, decoder.spec.lm_head.kind]


# d_model 128 (two 64-input steps), 96 (a 64 step and a 32 step), 104 and ffn 36 (scalar tails)
@pytest.mark.parametrize(("d_model", "d_ff"), [(128, 256), (96, 160), (104, 36)])
def test_two_four_layers_decode_to_the_dense_pruned_logits(make_model, lib, d_model, d_ff):
    model = two_four_model(make_model, d_model, d_ff)
    assert kinds(model) == [abi.S24] * 4 + [abi.F32]  # the lm_head stays dense
    for batch in (1, 3, 5, 6):
        tokens = inputs(batch, 211)
        got = decode_logits(model, tokens, native_path=True)
        want = decode_logits(model, tokens, native_path=False)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_a_row_count_that_is_no_whole_number_of_tiles_decodes_to_the_dense_pruned_logits(make_model, lib):
    # gpt2's up projection has d_ff rows: 43 = 10 tiles of 4 (AVX-512) and 3 rows; its down
    # projection (43 inputs) cannot be 2:4 and stays dense
    model = make_model("gpt2", vocab_size=211, d_model=64, n_head=4, d_ff=43, context=32, init_std=0.1)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.up):
                layer.weight.mul_(prune_mask(layer.weight.abs(), 0.5, "2:4", per_row=False))
    mark_two_four(model)
    assert kinds(model) == [abi.S24] * 3 + [abi.F32] * 2
    for batch in (1, 5, 7):
        tokens = inputs(batch, 211)
        want = decode_logits(model, tokens, native_path=False)
        torch.testing.assert_close(decode_logits(model, tokens, True), want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_a_layer_no_longer_two_four_decodes_dense(make_model, lib):
    model = two_four_model(make_model, 64, 128)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.fill_(0.01)  # all 4 of every group nonzero
    assert kinds(model)[2] == abi.F32 and kinds(model)[0] == abi.S24
    tokens = inputs(2, 211)
    want = decode_logits(model, tokens, native_path=False)
    torch.testing.assert_close(decode_logits(model, tokens, True), want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_a_compact_directory_decodes_natively_to_the_dense_copys_logits(tiny_model_dir, tmp_path, lib):
    run_prune(tiny_model_dir, tmp_path / "p24", 0.5, "magnitude", "2:4")
    sparse = lmforge.load(tmp_path / "p24")
    sparse.save(tmp_path / "dense")
    dense = lmforge.load(tmp_path / "dense")
    assert getattr(sparse.model.blocks[0].attn.qkv, SPARSE_ATTR) == "2:4"
    assert not hasattr(dense.model.blocks[0].attn.qkv, SPARSE_ATTR)
    assert kinds(sparse.model)[:4] == [abi.S24] * 4 and kinds(dense.model)[:4] == [abi.F32] * 4
    tokens = inputs(2, sparse.model.config.vocab)
    got = decode_logits(sparse.model, tokens, native_path=True)
    want = decode_logits(dense.model, tokens, native_path=True)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    text = sparse.generate(["the"], max_new_tokens=6)
    assert text == dense.generate(["the"], max_new_tokens=6)
