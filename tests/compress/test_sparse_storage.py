"""Compact storage of pruned weights: 2:4 (values + 2-bit indices) and bitmap, exact round trips,
file size, logits through lmforge.load, corrupt files refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.compress.prune import block_linears, prune_mask, run_prune
from lmforge.compress.sparse_format import (
    check_two_four, pack_bitmap, pack_two_four, pack_two_four_for_kernels, unpack_bitmap, unpack_two_four,
)
from lmforge.errors import LmforgeError
from lmforge.model_files import WEIGHTS


def two_four_matrix(N: int, K: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    return (w * prune_mask(w.abs(), 0.5, "2:4", per_row=True)).to(dtype)


@pytest.mark.parametrize("K", [8, 12, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_four_round_trip_is_exact(K, dtype):
    w = two_four_matrix(16, K, dtype=dtype)
    w[3, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with one nonzero
    w[5, 4:8] = 0  # and one with none
    values, indices = pack_two_four(w)
    assert values.dtype == dtype and values.shape == (16, K // 2)
    assert indices.dtype == torch.uint8 and indices.shape == (16, (K // 4 + 1) // 2)
    assert torch.equal(unpack_two_four(values, indices, K), w)


def test_the_kernels_order_permutes_each_whole_32_input_block_and_keeps_the_tail():
    w = torch.zeros(2, 72)  # two whole blocks of 32 inputs and a tail of 8
    w[:, 0::2] = torch.arange(1, 73, dtype=torch.float32).reshape(2, 36)  # values 1.., in input order
    values, indices = pack_two_four(w)
    kernel_values, kernel_indices = pack_two_four_for_kernels(w)
    assert torch.equal(kernel_indices, indices)  # the positions are the file's
    assert kernel_values[0, :8].tolist() == [1, 2, 5, 6, 3, 4, 7, 8]
    assert kernel_values[0, 8:16].tolist() == [9, 10, 13, 14, 11, 12, 15, 16]
    assert kernel_values[1, 16:24].tolist() == [53, 54, 57, 58, 55, 56, 59, 60]
    assert torch.equal(kernel_values[:, 32:], values[:, 32:])  # the last 8 inputs' 4 values
    assert sorted(kernel_values.flatten().tolist()) == sorted(values.flatten().tolist())


def test_two_four_index_layout_is_two_positions_per_nibble():
    w = torch.zeros(1, 8)
    w[0, 1], w[0, 3] = 1.0, 2.0  # group 0: positions 1, 3 -> nibble 1 | 3 << 2 = 13
    w[0, 4], w[0, 6] = 3.0, 4.0  # group 1: positions 0, 2 -> nibble 0 | 2 << 2 = 8
    values, indices = pack_two_four(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert indices.tolist() == [[13 | 8 << 4]]


def test_a_matrix_that_is_not_two_four_is_refused_in_one_line():
    w = two_four_matrix(4, 16)
    w[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(LmforgeError, match=r"not 2:4 sparse: row 2, inputs 8..11 hold 3 nonzeros") as e:
        pack_two_four(w, "blocks.0.mlp.up")
    assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="not divisible by 4"):
        check_two_four(torch.zeros(2, 6))


def test_corrupt_two_four_indices_are_one_line_errors():
    values, indices = pack_two_four(two_four_matrix(4, 16))
    bad = indices.clone()
    bad[1, 0] = (bad[1, 0] & 0xF0) | (2 | 1 << 2)  # positions 2 then 1: not increasing
    with pytest.raises(LmforgeError, match="corrupt 2:4 index at row 1, group 0") as e:
        unpack_two_four(values, bad, 16)
    assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="do not describe a matrix of 20 inputs"):
        unpack_two_four(values, indices, 20)


def test_bitmap_round_trip_is_exact_and_checks_its_count():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 37, generator=gen) * (torch.rand(8, 37, generator=gen) > 0.8)
    values, bitmap = pack_bitmap(w)
    assert values.numel() == int((w != 0).sum()) and bitmap.shape == (8, 5)
    assert torch.equal(unpack_bitmap(values, bitmap, 37), w)
    with pytest.raises(LmforgeError, match="values are stored"):
        unpack_bitmap(values[:-1], bitmap, 37)


def dense_copy(src, out):
    """The same model saved with its zeros stored densely (the reference)."""
    m = lmforge.load(src)
    m.save(out)
    return out


@pytest.fixture(scope="module")
def wide_model_dir(tokenizer, make_config, tmp_path_factory):
    """A model whose block linears dominate its size (a small vocabulary, wide layers)."""
    from lmforge.model import Transformer
    from lmforge.model_dir import save_model_dir

    torch.manual_seed(0)
    model = Transformer(make_config("llama", vocab_size=tokenizer.vocab_size, context=64, d_model=128, n_layer=2))
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("models") / "wide")


def test_two_four_model_file_is_compact_and_loads_to_the_same_logits(wide_model_dir, tmp_path):
    out = tmp_path / "p24"
    run_prune(wide_model_dir, out, 0.5, "magnitude", "2:4")
    dense = dense_copy(out, tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmforge_sparse" and config["lmforge_model_type"] == "llama"
    scfg = config["sparsity_config"]
    assert scfg["counts"] == {"2:4": 8, "bitmap": 0}
    assert "sparsity_config" not in json.loads((dense / "config.json").read_text())  # reloaded: saved dense
    tensors = load_file(str(out / WEIGHTS))
    assert "blocks.0.mlp.up.indices" in tensors and "blocks.0.mlp.up.weight" not in tensors
    # block linears: half the values plus indices; the embedding and norms stay dense
    linear_bytes = sum(4 * lmforge.load(dense).model.get_submodule(n).weight.numel()
                       for n in block_linears(lmforge.load(dense).model))
    compact_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".values", ".indices")))
    assert compact_bytes == linear_bytes * (0.5 + 1 / 32)  # fp32 halves + a byte per 8 inputs
    saved = (dense / WEIGHTS).stat().st_size - (out / WEIGHTS).stat().st_size
    assert saved == pytest.approx(linear_bytes - compact_bytes, rel=0.01)  # headers differ by names
    a, b = lmforge.load(out), lmforge.load(dense)
    for name in block_linears(a.model):
        assert torch.equal(a.model.get_submodule(name).weight, b.model.get_submodule(name).weight)
    tokens = torch.randint(0, a.model.config.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model(tokens), b.model(tokens))


def test_very_sparse_unstructured_layers_are_stored_as_bitmaps(tiny_model_dir, tmp_path):
    out = tmp_path / "p80"
    run_prune(tiny_model_dir, out, 0.8, "magnitude")
    assert json.loads((out / "config.json").read_text())["sparsity_config"]["counts"]["bitmap"] == 8
    dense = dense_copy(out, tmp_path / "dense")
    assert (out / WEIGHTS).stat().st_size < (dense / WEIGHTS).stat().st_size
    a, b = lmforge.load(out), lmforge.load(dense)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    # below the threshold the zeros stay dense
    run_prune(tiny_model_dir, tmp_path / "p50", 0.5, "magnitude")
    assert "sparsity_config" not in json.loads((tmp_path / "p50" / "config.json").read_text())


def test_corrupt_index_bytes_in_a_directory_are_one_line_errors(tiny_model_dir, tmp_path, cli):
    out = tmp_path / "p24"
    run_prune(tiny_model_dir, out, 0.5, "magnitude", "2:4")
    tensors = load_file(str(out / WEIGHTS))
    tensors["blocks.1.attn.proj.indices"][0, 0] = 0xFF  # positions 3 and 3
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="blocks.1.attn.proj: corrupt 2:4 index at row 0, group 0"):
        lmforge.load(out)
    r = cli("generate", out, "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 2 and "corrupt 2:4 index" in r.stderr and "Traceback" not in r.stderr
    del tensors["blocks.1.attn.proj.indices"]
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="declared 2:4 but its tensors are missing"):
        lmforge.load(out)


def test_export_hf_writes_dense_weights_transformers_reads(tiny_model_dir, tmp_path):
    from lmforge.interop.convert import export_model

    out = tmp_path / "p24"
    run_prune(tiny_model_dir, out, 0.5, "magnitude", "2:4")
    export_model(out, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and "sparsity_config" not in config
    tensors = load_file(str(tmp_path / "hf" / WEIGHTS))
    assert "model.layers.0.mlp.down_proj.weight" in tensors


def test_an_encrypted_compact_directory_loads_with_its_key(tiny_model_dir, tmp_path):
    from lmforge.interop.crypto import encrypt_model_dir, new_key_file

    out = tmp_path / "p24"
    run_prune(tiny_model_dir, out, 0.5, "magnitude", "2:4")
    want = lmforge.load(out).model.state_dict()
    key = new_key_file(tmp_path / "key")
    encrypt_model_dir(out, key)
    with pytest.raises(LmforgeError, match="encrypted"):
        lmforge.load(out)
    got = lmforge.load(out, key=key).model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
