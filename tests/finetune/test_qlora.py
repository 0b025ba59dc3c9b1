"""QLoRA: LoRA over int8/int4 QuantizedLinear bases (lmforge.compress), gradients through the
dequantized matmul, a smaller frozen base, and an adapter that loads onto the full-precision base."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, random_model, save_random_model, small_tokenizer, write_jsonl

import lmforge
from lmforge.config import deep_merge
from lmforge.adapters import apply_adapter, apply_lora
from lmforge.model.lora import LoraSettings, merge_lora
from lmforge.train.finetune import QloraSettings, finetune, load_finetune_config, model_bytes, quantize_base

IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base(bits):
    model = random_model("llama")
    before = model_bytes(model)
    quantize_base(model, QloraSettings(bits=bits, group_size=32))
    assert model_bytes(model) < before
    with torch.no_grad():
        quantized = model(IDS)
    apply_lora(model, LoraSettings(r=4))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), quantized)  # B = 0: the quantized base's output
    randomize_adapters(model)
    model.train()
    x = IDS
    out = model(x)
    out.logsumexp(-1).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    # the custom backward equals autograd through a plain matmul on the dequantized weight
    layer = model.blocks[0].attn.qkv
    h = torch.randn(3, 32, requires_grad=True)
    layer.base_forward(h).pow(2).sum().backward()
    ref = h.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(ref, layer.base.dequantize()).pow(2).sum().backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_qlora_sft_run(tmp_path):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    rows = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in ["red", "green", "blue", "sea"] * 16]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_finetune_config(None, deep_merge({
        "base": str(base), "task": "sft", "method": "qlora", "data": {"train": str(train)},
        "qlora": {"bits": 4, "group_size": 32}, "lora": {"r": 8},
        "train": {"batch_size": 8, "lr": 1e-2, "max_steps": 30, "warmup": 2, "checkpoint_every": 1000,
                  "log_every": 5, "device": "cpu"},
        "eval": {"every": 10, "batches": 4}, "run": {"name": "q", "out": str(tmp_path / "runs")}}, {}))
    result = finetune(cfg, progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    # the adapter was trained against the quantized base but belongs to the original one
    m = apply_adapter(lmforge.load(base), result.output)
    with torch.no_grad():
        assert torch.isfinite(m.model(IDS[:, :10] % tok.vocab_size)).all()
