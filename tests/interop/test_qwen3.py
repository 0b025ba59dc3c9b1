"""Qwen3 and YaRN rope scaling: transformers' logits both ways, KV-cache generation, llama.cpp,
LoRA (PEFT reads ours), int8/int4 quantization and the native decoder, and clear refusals."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from tiny_models import (VOCAB, hf_logits, probe_ids, random_hf_model, save_hf_dir, transformers,
                         without_lmforge_keys)

import lmforge
from lmforge.compress.quantize import quantize_model
from lmforge.errors import LmforgeError
from lmforge.infer.generate import generate_ids
from lmforge.infer.native_decode import why_not
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.convert import export_model, import_model
from lmforge.interop.gguf_io import export_gguf

CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
YARN_VARIANTS = {"default": {}, "attention_factor": {"attention_factor": 1.3},
                 "mscale": {"mscale": 1.0, "mscale_all_dim": 0.5}, "betas": {"beta_fast": 16.0, "beta_slow": 2.0},
                 "no-truncate": {"truncate": False}}


def tiny_hf(family: str, rope_scaling: dict | None = None, seed: int = 0, **extra):
    """A tiny transformers model of `family` with random norms (and biases); 64 positions."""
    cfg = CONFIGS[family](vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_theta=10000.0, rope_scaling=rope_scaling, initializer_range=0.1, **extra)
    return random_hf_model(cfg, seed)


def ours(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids)


def test_qwen3_head_dim_and_per_head_norms(hf_dirs):
    hf_model, hf_dir = hf_dirs["qwen3"]
    m = lmforge.load(hf_dir)
    assert m.config.dim_head == 16 != m.config.d_model // m.config.n_head
    assert m.config.has_qk_norm and not m.config.has_qkv_bias
    attn = m.model.blocks[1].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 32) and attn.proj.weight.shape == (32, 64)
    theirs = hf_model.model.layers[1].self_attn
    assert torch.equal(attn.q_norm.weight, theirs.q_norm.weight)
    assert torch.equal(attn.k_norm.weight, theirs.k_norm.weight)
    with torch.no_grad():  # the norms matter: without them the logits are another model's
        expected = hf_logits(hf_model, probe_ids())
        for block in m.model.blocks:
            block.attn.q_norm.weight.fill_(1.0)
        assert (ours(m, probe_ids()) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen3", "mixtral", "qwen3_moe"])
def test_kv_cache_greedy_decoding_equals_transformers_generate(family, hf_dirs):
    hf_model, hf_dir = hf_dirs[family]
    m = lmforge.load(hf_dir)
    prompts = [probe_ids(7, 1)[0].tolist(), probe_ids(4, 2)[1].tolist()]
    for native in (True, False):
        got, _ = generate_ids(m.model, prompts, SamplingParams(max_new_tokens=16), eos_id=None, native=native)
        for prompt, tokens in zip(prompts, got):
            with torch.no_grad():
                theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            assert tokens == theirs, (family, native)
    assert why_not(m.model) is None  # the native path above was the C decoder


@pytest.mark.parametrize("variant", list(YARN_VARIANTS))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_yarn_matches_transformers_both_ways(family, variant, tokenizer, tmp_path):
    scaling = {**YARN, **YARN_VARIANTS[variant]}
    hf_model = tiny_hf(family, scaling)
    hf_dir = save_hf_dir(hf_model, tokenizer, tmp_path / "hf")
    ids = probe_ids(48)
    expected = hf_logits(hf_model, ids)
    m = lmforge.load(import_model(hf_dir, tmp_path / "imported"))
    assert m.config.rope_scaling.rope_type == "yarn" and m.config.rope_scaling.factor == 4.0
    assert (ours(m, ids) - expected).abs().max() < 1e-4
    back_dir = export_model(tmp_path / "imported", "hf", tmp_path / "exported")
    assert json.loads((back_dir / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    back = transformers.AutoModelForCausalLM.from_pretrained(back_dir, attn_implementation="eager").eval()
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4
    # the scaling is really applied: the same weights without it give other logits
    plain = tiny_hf(family, None)
    assert (hf_logits(plain, ids) - expected).abs().max() > 1e-2


@pytest.mark.parametrize(("family", "variant"), [("qwen3", "default"), ("qwen3", "attention_factor"),
                                                 ("llama", "betas")])
def test_yarn_runs_the_same_in_llama_cpp(family, variant, tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    hf_model = tiny_hf(family, {**YARN, **YARN_VARIANTS[variant]})
    m = lmforge.load(save_hf_dir(hf_model, tokenizer, tmp_path / "hf"))
    path = export_gguf(m, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    arch = "qwen3" if family == "qwen3" else "llama"
    assert reader.get_field(f"{arch}.rope.scaling.type").contents() == "yarn"
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        ids = probe_ids(40, 1)[0].tolist()
        llm.eval(ids)
        expected = ours(m, torch.tensor([ids]))[0]
        # llama.cpp's f32 graph differs by ~1e-3 of the logits' scale with or without scaling
        assert (torch.tensor(llm.scores[:len(ids)]) - expected).abs().max() < 1e-3 * expected.abs().max()
    finally:
        llm.close()
    back = lmforge.load(import_model(path, tmp_path / "back"))
    assert back.config.rope_scaling == m.config.rope_scaling
    foreign = lmforge.load(import_model(without_lmforge_keys(path, tmp_path / "foreign.gguf"), tmp_path / "foreign"))
    assert foreign.config.rope_scaling.rope_type == "yarn"
    ids = probe_ids(48)
    assert (ours(foreign, ids) - ours(m, ids)).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "bound"), [("int8", 0.02), ("int4", 0.15)])
def test_qwen3_quantized_stays_close_and_decodes_natively(method, bound, hf_dirs):
    m = lmforge.load(hf_dirs["qwen3"][1])
    ids = probe_ids()
    reference = ours(m, ids)
    q = quantize_model(copy.deepcopy(m.model), method, 32)
    with torch.no_grad():
        got = q(ids)
    assert ((got - reference).norm() / reference.norm()).item() < bound
    assert why_not(q) is None
    prompt = [probe_ids(6, 1)[0].tolist()]
    native, _ = generate_ids(q, prompt, SamplingParams(max_new_tokens=10), eos_id=None, native=True)
    python, _ = generate_ids(q, prompt, SamplingParams(max_new_tokens=10), eos_id=None, native=False)
    assert sum(a == b for a, b in zip(native[0], python[0])) >= 8  # int8 activations in C: near, not equal


@pytest.mark.parametrize(("change", "message"), [
    ({"attention_bias": True}, "attention_bias are not supported"),
    ({"use_sliding_window": True}, "use_sliding_window are not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic' is not supported"),
])
def test_what_lmforge_does_not_model_is_refused_in_one_line(change, message, hf_dirs, tmp_path):
    folder = shutil.copytree(hf_dirs["qwen3"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LmforgeError, match=message):
        lmforge.load(folder)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_linear_rope_scaling_matches_transformers_both_ways(family, tokenizer, tmp_path):
    hf_model = tiny_hf(family, {"rope_type": "linear", "factor": 4.0})
    ids = probe_ids(48)
    expected = hf_logits(hf_model, ids)
    assert (hf_logits(tiny_hf(family, None), ids) - expected).abs().max() > 1e-2
    m = lmforge.load(import_model(save_hf_dir(hf_model, tokenizer, tmp_path / "hf"), tmp_path / "imported"))
    assert m.config.rope_scaling.rope_type == "linear"
    assert (ours(m, ids) - expected).abs().max() < 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(export_model(tmp_path / "imported", "hf", tmp_path / "out"),
                                                             attn_implementation="eager").eval()
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4
