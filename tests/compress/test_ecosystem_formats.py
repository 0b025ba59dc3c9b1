"""Quantized outputs other loaders read (compressed-tensors), and the ones they must refuse.

Tiny random llama (untied lm_head) and qwen2 (tied embeddings, qkv bias) models made by
transformers; widths are multiples of 32 so int4 groups of 32 and int8 kernels fit.
"""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.compress import ecosystem
from lmforge.compress.quantize import run_quantize
from lmforge.errors import LmforgeError

transformers = pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")

VOCAB = 320
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
}
METHODS = {"int8": None, "int4": 32, "gptq": 32}


@pytest.fixture(scope="module")
def fp32_dirs(tmp_path_factory):
    from lmforge.data.tokenizer import train_tokenizer

    text = ["Quantized weights: 量化后的权重 load in transformers and vLLM.", "def forward(self, x): return x @ W.T",
            "The slings and arrows of outrageous fortune, 以及 other text."] * 30
    tokenizer = train_tokenizer(text, VOCAB)
    out = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make())
        with torch.no_grad():  # weights at a scale where 4 bits visibly change the logits
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 2 else 0.05) + (1.0 if p.dim() == 1 else 0.0))
        hf = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(hf)
        tokenizer.save(hf)
        out[family] = lmforge.load(hf).save(tmp_path_factory.mktemp(f"lm-{family}") / "fp32")
    return out, tmp_path_factory.mktemp("calibration") / "calib.txt"


@pytest.fixture(scope="module")
def quantized(fp32_dirs, tmp_path_factory):
    dirs, calib = fp32_dirs
    calib.write_text("\n".join(["Calibration text for GPTQ, 校准数据 with code: x = y + 1;"] * 64))
    out = {}
    for family, src in dirs.items():
        for method, group in METHODS.items():
            target = tmp_path_factory.mktemp(f"{family}-{method}") / "q"
            run_quantize(src, method, target, group_size=group, data=calib, samples=8, seq_len=32, log=lambda s: None)
            out[family, method] = target
    return out


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else (out if torch.is_tensor(out) else out[0])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_transformers_loads_the_quantized_model_with_lmforges_logits(fp32_dirs, quantized, family, method):
    """A 24-token prompt runs lmforge's layers as a matmul on the dequantized weight, the arithmetic
    transformers' compressed-tensors layers use; the codes and scales are the same numbers, so only the
    summation order differs: fp32 rounding, 1e-4 of the logits' scale. The quantization itself moves the
    logits far more (checked against the fp32 model), so a loader that silently fell back to other
    weights could not pass."""
    folder = quantized[family, method]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = logits_of(lmforge.load(folder).model, ids)
    theirs = logits_of(transformers.AutoModelForCausalLM.from_pretrained(folder), ids)
    fp32 = logits_of(lmforge.load(fp32_dirs[0][family]).model, ids)
    scale = ours.abs().max().item()
    assert (ours - theirs).abs().max().item() < 1e-4 * scale
    assert (ours - fp32).abs().max().item() > 1e-2 * scale  # the quantization is really there


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_decoding_a_few_tokens_agrees_within_the_activation_rounding(quantized, method):
    """Up to 16 rows lmforge's native kernel also rounds the activations to int8 in blocks of 32 (as
    llama.cpp does), transformers does not. That rounding (half a step of 1/127 of each block's largest
    activation) moved these logits by 3-4% (int8) and 10% (int4, larger activations) of their standard
    deviation; the tolerance is 20% of it, and the greedy next token must agree."""
    folder = quantized["llama", method]
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    ours = logits_of(lmforge.load(folder).model, ids)
    theirs = logits_of(transformers.AutoModelForCausalLM.from_pretrained(folder), ids)
    assert (ours - theirs).abs().max().item() < 0.2 * ours.std().item()
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())


def test_lmforge_reloads_its_compressed_tensors_model_exactly(fp32_dirs, quantized, tmp_path):
    """Read back, the layers hold the very codes quantization made: saving again gives the same tensors,
    and the tied qwen2 embedding is the lm_head again."""
    folder = quantized["qwen2", "int4"]
    m = lmforge.load(folder)
    assert m.model.lm_head.weight is m.model.tok_emb.weight
    assert m.model.quantization["algorithm"] == "rtn" and m.model.quantization["layout"] == "compressed-tensors"
    assert bool((m.model.blocks[0].attn.qkv.zeros == 8).all())  # symmetric: what compressed-tensors stores
    m.save(tmp_path / "again")
    from safetensors.torch import load_file

    first, second = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert lmforge.load(quantized["llama", "gptq"]).model.quantization["algorithm"] == "gptq"


@pytest.mark.parametrize("block_values", [None, 200])  # 200: two rows of 96 a block, 12 blocks
@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_the_one_compressed_tensors_reads(bits, block_values, monkeypatch):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from lmforge.compress import qlinear

    if block_values:
        monkeypatch.setattr(qlinear, "ROW_BLOCK_VALUES", block_values)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (24, 96), generator=torch.Generator().manual_seed(bits))
    ours = ecosystem.pack_int32(codes, bits)
    assert torch.equal(ours, pack_to_int32(codes.to(torch.int8), bits))
    assert torch.equal(ecosystem.unpack_int32(ours, bits, 96).to(torch.int8),
                       unpack_from_int32(ours, bits, torch.Size([24, 96])))


def test_lmforge_reads_an_asymmetric_compressed_tensors_model(quantized, tmp_path):
    """Asymmetric int4 (packed zero points) is what other tools write too; lmforge reads it, even though
    transformers cannot yet (its loader expects unpacked zero points)."""
    from safetensors.torch import load_file, save_file

    src = quantized["llama", "int4"]
    model = lmforge.load(src).model
    tensors = load_file(src / "model.safetensors")
    # Every layer gets zero points of 0; one layer's codes move up by one with zero points of 1: the
    # same weights, except codes already at the top (7), which cannot move.
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        rows, groups = tensors[key.replace("weight_packed", "weight_scale")].shape
        zeros = torch.zeros(rows, groups, dtype=torch.int16)
        tensors[key.replace("weight_packed", "weight_zero_point")] = ecosystem.pack_int32(zeros.t(), 4).t().contiguous()
    name, layer = "model.layers.0.mlp.down_proj", model.blocks[0].mlp.down
    codes = ecosystem.unpack_int32(tensors[f"{name}.weight_packed"], 4, layer.in_features)
    tensors[f"{name}.weight_packed"] = ecosystem.pack_int32(codes.clamp(max=6) + 1, 4)
    zeros = torch.ones(layer.out_features, layer.in_features // layer.group_size, dtype=torch.int16)
    tensors[f"{name}.weight_zero_point"] = ecosystem.pack_int32(zeros.t(), 4).t().contiguous()
    folder = tmp_path / "asym"
    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    loaded = lmforge.load(folder).model
    movable = codes != 7
    assert movable.float().mean() > 0.9
    assert torch.equal(loaded.blocks[0].mlp.down.dequantize()[movable], layer.dequantize()[movable])
    assert torch.equal(loaded.blocks[1].attn.qkv.dequantize(), model.blocks[1].attn.qkv.dequantize())
    assert not bool((loaded.blocks[0].mlp.down.zeros == 8).all())


def test_lmforges_own_layout_is_refused_by_transformers_and_read_by_lmforge(fp32_dirs, tmp_path):
    """w8a8 (and --format lmforge) keep lmforge's tensor names: transformers must raise, not initialise
    random weights with a warning."""
    src = fp32_dirs[0]["llama"]
    logs = []
    run_quantize(src, "w8a8", tmp_path / "w8a8", log=logs.append)
    run_quantize(src, "int8", tmp_path / "native", log=lambda s: None, layout="lmforge")
    assert any("lmforge's own layout" in line for line in logs), logs
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    for folder in (tmp_path / "w8a8", tmp_path / "native"):
        with pytest.raises(ValueError, match="lmforge_quantized"):
            transformers.AutoModelForCausalLM.from_pretrained(folder)
        m = lmforge.load(folder)
        assert m.config.family == "llama"
        assert torch.isfinite(logits_of(m.model, ids)).all()


def test_a_layout_that_cannot_hold_the_model_is_one_clear_error(fp32_dirs, tmp_path, cli):
    src = fp32_dirs[0]["llama"]
    with pytest.raises(LmforgeError, match="w8a8"):
        run_quantize(src, "w8a8", tmp_path / "q", log=lambda s: None, layout="compressed-tensors")
    r = cli("quantize", src, "--method", "int8", "--format", "gguf", "--out", tmp_path / "q2")
    assert r.returncode == 2 and "--format 'gguf' is not one of" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "q2").exists()
    r = cli("quantize", src, "--method", "int8", "--out", tmp_path / "q3")
    assert r.returncode == 0 and "compressed-tensors layout" in r.stdout, r.stderr
