"""LoRA: equal to the base at initialization, merged equals unmerged, gradients only on the
adapter, and the adapter is PEFT's: `peft` loads ours onto `transformers` with the same logits,
and ours loads PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, random_model, save_random_model

import lmforge
from lmforge.errors import LmforgeError
from lmforge.adapters import apply_adapter, apply_lora, save_adapter, target_names
from lmforge.model.lora import LoraSettings, lora_layers, merge_lora, trainable_parameters

FAMILIES = ["gpt2", "llama", "qwen2", "phi3"]
IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_base_at_init_and_merged_equals_unmerged(family):
    model = random_model(family)
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(IDS), base)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        assert (adapted - base).abs().max() > 1e-2  # the adapter does something
        merge_lora(model)
        assert not lora_layers(model)
        torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_get_gradients():
    model = random_model("llama")
    apply_lora(model, LoraSettings(r=2, targets=["q_proj", "v_proj", "down_proj"]))
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    trainable, total = trainable_parameters(model)
    # q and v each get their own (A, B) inside the fused qkv; k and the MLP's gate/up none
    qkv = model.blocks[0].attn.qkv
    assert [s.short_name for s in qkv.slices] == ["q_proj", "v_proj"]
    assert qkv.lora_A.shape == (4, 32) and qkv.lora_B[0].shape == (32, 2) and qkv.lora_B[1].shape == (16, 2)
    assert 0 < trainable < 0.1 * total
    assert not lora_layers(model).get("blocks.0.mlp.up")


def test_unknown_target_is_a_clear_error():
    with pytest.raises(LmforgeError, match="c_attn.*not a module of this llama model.*q_proj"):
        apply_lora(random_model("llama"), LoraSettings(targets=["c_attn"]))
    assert target_names(random_model("gpt2")) == ["c_attn", "c_proj", "c_fc"]


def _hf_and_ours(tmp_path, family, targets):
    transformers = pytest.importorskip("transformers")
    base_dir = save_random_model(tmp_path / "base", family)
    ours = lmforge.load(base_dir)
    apply_lora(ours.model, LoraSettings(r=4, alpha=12, targets=targets))
    randomize_adapters(ours.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    return base_dir, ours, hf


@pytest.mark.parametrize("family,targets", [("gpt2", "all-linear"), ("llama", "all-linear"),
                                             ("llama", ["k_proj", "up_proj"]), ("qwen2", ["q_proj", "v_proj"]),
                                             ("phi3", "all-linear")])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, family, targets):
    peft = pytest.importorskip("peft")
    base_dir, ours, hf = _hf_and_ours(tmp_path, family, targets)
    adapter = save_adapter(ours.model, tmp_path / "adapter", str(base_dir), ours.meta)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["fan_in_fan_out"] == (family == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        mine = ours.model(IDS)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,targets", [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj", "gate_proj"])])
def test_we_load_a_peft_adapter_with_the_same_logits(tmp_path, family, targets):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base_dir = save_random_model(tmp_path / "base", family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2",
                             init_lora_weights=False)  # random B: a non-trivial adapter
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    ours = apply_adapter(lmforge.load(base_dir), tmp_path / "peft-adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours.model(IDS), theirs, atol=1e-4, rtol=1e-4)
        merged = apply_adapter(lmforge.load(base_dir), tmp_path / "peft-adapter", merge=True)
        torch.testing.assert_close(merged.model(IDS), theirs, atol=1e-4, rtol=1e-4)


def test_adapter_round_trip_and_mismatched_base_errors(tmp_path):
    base_dir = save_random_model(tmp_path / "base", "llama")
    m = lmforge.load(base_dir)
    apply_lora(m.model, LoraSettings(r=2, targets=["q_proj", "o_proj"]))
    randomize_adapters(m.model)
    adapter = save_adapter(m.model, tmp_path / "adapter", str(base_dir), m.meta)
    with torch.no_grad():
        expected = m.model(IDS)
        again = apply_adapter(lmforge.load(base_dir), adapter)
        assert torch.equal(again.model(IDS), expected)
    with pytest.raises(LmforgeError, match="already carries a LoRA adapter"):
        apply_adapter(again, adapter)
    # same shapes, other weights
    other = save_random_model(tmp_path / "other", "llama", seed=5)
    with pytest.raises(LmforgeError, match="weights differ"):
        apply_adapter(lmforge.load(other), adapter)
    # another architecture
    wide = save_random_model(tmp_path / "wide", "llama", d_model=64)
    with pytest.raises(LmforgeError, match="different base model.*head_dim"):
        apply_adapter(lmforge.load(wide), adapter)
    # without our provenance record (a PEFT adapter from elsewhere) the shapes still catch it
    (adapter / "lmforge.json").unlink()
    with pytest.raises(LmforgeError, match="different base model"):
        apply_adapter(lmforge.load(wide), adapter)
    gpt2 = save_random_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(LmforgeError, match="does not have"):
        apply_adapter(lmforge.load(gpt2), adapter)
    with pytest.raises(LmforgeError, match="not a LoRA adapter directory"):
        apply_adapter(lmforge.load(base_dir), base_dir)


def test_merge_and_generate_with_adapter_through_the_cli(tmp_path, cli):
    base_dir = save_random_model(tmp_path / "base", "llama")
    m = lmforge.load(base_dir)
    apply_lora(m.model, LoraSettings(r=2))
    randomize_adapters(m.model, scale=1.0)
    adapter = save_adapter(m.model, tmp_path / "adapter", str(base_dir), m.meta)
    with torch.no_grad():
        expected = m.model(IDS)
    r = cli("merge", base_dir, adapter, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = lmforge.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(IDS), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "merged" / "lmforge.json").read_text())["lora"]["r"] == 2
    with_adapter = cli("generate", base_dir, "--adapter", adapter, "-p", "To be", "--max-tokens", "8", "--no-stream")
    from_merged = cli("generate", tmp_path / "merged", "-p", "To be", "--max-tokens", "8", "--no-stream")
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == from_merged.stdout
    other = save_random_model(tmp_path / "other", "llama", seed=9)
    r = cli("generate", other, "--adapter", adapter, "-p", "x")
    assert r.returncode == 2 and "weights differ" in r.stderr


def test_serve_applies_an_adapter(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.serve.command import build_app
    from lmforge.serve.settings import ServeSettings

    base_dir = save_random_model(tmp_path / "base", "llama")
    m = lmforge.load(base_dir)
    apply_lora(m.model, LoraSettings(r=2))
    randomize_adapters(m.model, scale=1.0)
    adapter = save_adapter(m.model, tmp_path / "adapter", str(base_dir), m.meta)
    expected = m.generate(["To be"], max_new_tokens=6)[0]
    assert expected != lmforge.load(base_dir).generate(["To be"], max_new_tokens=6)[0]
    app = build_app(base_dir, ServeSettings(model_name="m"), adapter=adapter)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "To be", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    other = save_random_model(tmp_path / "other", "llama", seed=4)
    with pytest.raises(LmforgeError, match="weights differ"):
        build_app(other, ServeSettings(model_name="m"), adapter=adapter)
