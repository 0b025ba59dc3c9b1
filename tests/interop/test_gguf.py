"""GGUF export for llama.cpp: metadata it needs, tensors equal after the reader, import back."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, FAMILIES, probe_ids

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.convert import import_model
from lmforge.interop.gguf_io import ARCH, _hf_tensors, _layout, export_gguf, stack_experts
from lmforge.interop.hf import to_hf_config

gguf = pytest.importorskip("gguf")
TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing {key}"
    return f.contents()


def expected_after(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a tensor becomes after the round trip through its GGUF type."""
    x = t.numpy()
    if x.ndim < 2 or qtype == "f32":
        return t
    if qtype == "f16":
        return t.half().float()
    kind = TYPES[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).reshape(x.shape))


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {family: lmforge.load(hf_dirs[family][1]) for family in FAMILIES}


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_tensors_and_metadata(family, qtype, loaded, tmp_path):
    m = loaded[family]
    path = export_gguf(m, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(path)
    arch = ARCH[family]
    assert field(reader, "general.architecture") == arch
    cfg = m.config
    for key, value in {"context_length": cfg.context, "embedding_length": cfg.d_model, "block_count": cfg.n_layer,
                       "feed_forward_length": cfg.ffn_dim, "attention.head_count": cfg.n_head}.items():
        assert field(reader, f"{arch}.{key}") == value
    if family != "gpt2":
        assert field(reader, f"{arch}.attention.head_count_kv") == cfg.kv_heads
        assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab and len(field(reader, "tokenizer.ggml.token_type")) == cfg.vocab
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|endoftext|>"
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    stored = {t.name: t for t in reader.tensors}
    expected_names = set()
    for hf_name, t in stack_experts(_hf_tensors(m.model), cfg.n_experts):  # a layer's experts in one tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        expected_names.add(name)
        g = stored[name]
        want = expected_after(_layout(hf_name, t, cfg, to_gguf=True), qtype)
        got = gguf.quants.dequantize(g.data, g.tensor_type).reshape(tuple(reversed(g.shape.tolist())))
        assert torch.equal(torch.from_numpy(got.astype("float32")), want.float()), name
    if family == "llama":  # Llama-3 RoPE scaling travels as per-frequency factors
        expected_names.add("rope_freqs.weight")
    assert set(stored) == expected_names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_import_round_trip(family, loaded, tmp_path):
    m = loaded[family]
    ids = probe_ids()
    path = export_gguf(m, tmp_path / "m.gguf", "f32")
    back = lmforge.load(import_model(path, tmp_path / "back"))
    assert to_hf_config(back.config) == to_hf_config(m.config)
    with torch.no_grad():
        assert (back.model(ids) - m.model(ids)).abs().max() < 1e-4
    assert back.tokenizer.encode("To be, or not <|im_end|>") == m.tokenizer.encode("To be, or not <|im_end|>")
    assert back.tokenizer.chat_template == CHAT_TEMPLATE
    q8 = lmforge.load(import_model(export_gguf(m, tmp_path / "q8.gguf", "q8_0"), tmp_path / "q8"))
    with torch.no_grad():
        assert (q8.model(ids) - m.model(ids)).abs().max() < 0.05  # dequantized


def test_foreign_gguf_without_lmforge_config(loaded, tmp_path):
    """A GGUF from elsewhere carries only llama.cpp's keys; the config is rebuilt from them."""
    m = loaded["qwen2"]
    path = export_gguf(m, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "foreign.gguf", "qwen2")
    for f in reader.fields.values():
        if f.name.startswith(("GGUF.", "general.architecture", "lmforge.")):
            continue
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = lmforge.load(import_model(tmp_path / "foreign.gguf", tmp_path / "back"))
    assert back.config.family == "qwen2" and back.config.tie_embeddings
    ids = probe_ids()
    with torch.no_grad():
        assert (back.model(ids) - m.model(ids)).abs().max() < 1e-4


def test_corrupt_gguf_is_a_clean_error(loaded, tmp_path):
    path = export_gguf(loaded["gpt2"], tmp_path / "m.gguf", "q8_0")
    raw = path.read_bytes()
    for cut in (3, 40, len(raw) // 2, len(raw) - 7):
        path.write_bytes(raw[:cut])
        with pytest.raises(LmforgeError, match="m.gguf"):
            import_model(path, tmp_path / f"o{cut}")
        assert not (tmp_path / f"o{cut}").exists()
    with pytest.raises(LmforgeError, match="should end in .gguf"):
        export_gguf(loaded["gpt2"], tmp_path / "m.bin")
    with pytest.raises(LmforgeError, match="is not one of"):
        export_gguf(loaded["gpt2"], tmp_path / "x.gguf", "q5_k")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_the_export(family, loaded, tmp_path):
    """llama.cpp itself reads the file: same logits in f32, same tokens from its tokenizer.
    8 tokens: llama.cpp's llama and phi3 graphs ignore a sliding window (8 in these models)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (it builds from source)")
    m = loaded[family]
    llm = llama_cpp.Llama(str(export_gguf(m, tmp_path / "m.gguf", "f32")), n_ctx=64, logits_all=True,
                          verbose=False, n_threads=2)
    ids = probe_ids(8, 1)[0].tolist()
    llm.eval(ids)
    with torch.no_grad():
        ours = m.model(torch.tensor([ids]))[0]
    assert (torch.tensor(llm.scores[:len(ids)]) - ours).abs().max() < 1e-3
    text = "To be, or not <|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == m.tokenizer.encode(text)


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_export_holds_one_converted_tensor_at_a_time(qtype, tokenizer, tmp_path):
    """The file is written tensor by tensor (names and sizes first): the converted arrays of the whole
    model are never held at once. numpy's allocations are what tracemalloc sees here."""
    import tracemalloc

    from lmforge.config import ModelConfig
    from lmforge.loaded import LoadedModel
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=8, n_head=4, n_kv_head=2,
                      d_model=256, d_ff=768, context=64, tie_embeddings=False)
    model = Transformer(cfg).eval()
    weights = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    tracemalloc.start()
    try:
        path = export_gguf(LoadedModel(model, tokenizer), tmp_path / "m.gguf", qtype, log=lambda *a: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert largest < 0.1 * weights
    assert peak < 3 * largest, (peak, largest, weights)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 2 + 9 * cfg.n_layer + 1
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {TYPES[qtype]}
