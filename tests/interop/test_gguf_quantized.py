"""GGUF from an already-quantized lmforge model (its codes kept), and the k-quants q6_K and q4_K_M.

A tiny random llama whose rows are whole k-quant super-blocks (256 inputs, 512 hidden), so every
matrix takes the asked type; llama.cpp (llama_cpp_python) reads each file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmforge
from lmforge.compress.quantize import run_quantize
from lmforge.interop import gguf_quants
from lmforge.interop.gguf_io import export_gguf, load_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
VOCAB = 320


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import TEXT

    from lmforge.data.tokenizer import train_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() == 2 else 0.02) + (1.0 if p.dim() == 1 else 0.0))
    root = tmp_path_factory.mktemp("gguf-quantized")
    hf.save_pretrained(root / "hf")
    train_tokenizer(TEXT, VOCAB).save(root / "hf")
    lmforge.load(root / "hf").save(root / "fp32")
    run_quantize(root / "fp32", "int8", root / "int8", log=lambda s: None)
    run_quantize(root / "fp32", "int4", root / "int4", group_size=64, log=lambda s: None)
    return {name: lmforge.load(root / name) for name in ("fp32", "int8", "int4")}


@pytest.mark.parametrize("method,qtype", [("int8", "q8_0"), ("int4", "q4_0")])
def test_the_quantized_codes_are_kept(models, method, qtype, tmp_path):
    """Every matrix of the file is the lmforge layer's own dequantized weight, but for the scale held in
    fp16 (relative rounding 2^-11): read back through gguf's decoder, q/k rows un-permuted."""
    m = models[method]
    notes = []
    path = export_gguf(m, tmp_path / "m.gguf", qtype, log=notes.append)
    assert any("codes kept" in n for n in notes), notes
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == kinds["output.weight"] == qtype.upper()
    back, _ = load_gguf(path)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.down", "lm_head"):
        ours = m.model.get_submodule(name).dequantize()
        theirs = back.get_submodule(name).weight.detach()
        step = ours.abs().max()
        assert (theirs - ours).abs().max() <= step * 2 ** -10
    fp32 = models["fp32"].model.blocks[1].mlp.down.weight.detach()
    assert (back.blocks[1].mlp.down.weight - fp32).abs().max() > 10 * (back.blocks[1].mlp.down.weight
                                                                      - m.model.blocks[1].mlp.down.dequantize()).abs().max()


def test_a_type_the_codes_do_not_map_onto_is_requantized_with_a_note(models, tmp_path):
    notes = []
    export_gguf(models["int8"], tmp_path / "m.gguf", "q6_k", log=notes.append)
    assert any("requantized from the dequantized weights" in n for n in notes), notes


@pytest.mark.parametrize("kind,bound", [("q6_k", 0.025), ("q4_k", 0.1)])
def test_k_quant_blocks_decode_with_ggufs_reader(kind, bound):
    """Our encoder against gguf's own decoder (ggml's layout): the error is that of 6 / 4 bits on each
    sub-block's range (step/sqrt(12) relative rms: about 0.02 and 0.08 on Gaussian weights)."""
    w = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32) * 0.1
    w[0, :256] = 0.0  # an all-zero super-block: no division by zero
    encode = {"q6_k": gguf_quants.quantize_q6_k, "q4_k": gguf_quants.quantize_q4_k}[kind]
    blocks = encode(w)
    ggml = gguf.GGMLQuantizationType[kind.upper()]
    assert blocks.shape == (6, 512 // 256 * gguf.GGML_QUANT_SIZES[ggml][1])
    back = gguf.quants.dequantize(blocks, ggml).reshape(w.shape)
    assert np.all(back[0, :256] == 0)
    assert np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()) < bound


def test_q4_k_m_keeps_llama_cpps_tensors_at_q6_k():
    assert gguf_quants.q4_k_m_type("output.weight", 32) == "q6_k"
    assert [gguf_quants.more_bits(i, 32) for i in (0, 3, 4, 5, 6, 28, 31)] == [True, True, False, False, True, True, True]
    assert gguf_quants.q4_k_m_type("blk.0.attn_v.weight", 32) == "q6_k"
    assert gguf_quants.q4_k_m_type("blk.4.ffn_down.weight", 32) == "q4_k"
    assert gguf_quants.q4_k_m_type("blk.4.attn_q.weight", 32) == "q4_k"


@pytest.mark.slow
@pytest.mark.parametrize("source,qtype,bound,same_greedy", [
    ("int8", "q8_0", 0.2, True),     # codes kept; llama.cpp also rounds activations to 8 bits
    ("int4", "q4_0", 1.0, False),    # codes kept; 4-bit weights make this random model's logits jumpy
    ("fp32", "q6_k", 0.5, True),
    ("fp32", "q4_k_m", 1.5, False),
])
def test_llama_cpp_runs_the_quantized_file(models, source, qtype, bound, same_greedy, tmp_path):
    """llama.cpp loads the file and generates; its logits stay within `bound` x the logits' standard
    deviation of the lmforge model they came from (measured: q8_0 0.1, q4_0 0.7, q6_K 0.4, q4_K_M 1.1
    on this deliberately sensitive random model; a wrong block layout gives noise far beyond)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    m = models[source]
    path = export_gguf(m, tmp_path / "m.gguf", qtype, log=lambda s: None)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    expected = {"q4_k_m": {"F32", "Q4_K", "Q6_K"}}.get(qtype, {"F32", qtype.upper()})
    assert kinds == expected
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = m.model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < bound * ours.std()
    if same_greedy:
        assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    out = llm.create_completion(m.tokenizer.decode(ids[:4]), max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
