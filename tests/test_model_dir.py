"""The model directory: our saves load back exactly and load in transformers; broken ones are clear errors."""

from __future__ import annotations

import json
import shutil
from typing import get_args

import pytest
import torch

import lmforge
from lmforge.config import Family
from lmforge.errors import LmforgeError
from lmforge.interop.hf import to_hf_config
from lmforge.model_dir import atomic_directory, save_model_dir

WINDOWED = ("mistral", "phi3")
VARIANTS = {f: {"sliding_window": 8} if f in WINDOWED else {} for f in get_args(Family)}
VARIANTS["llama-rope3-untied"] = {
    "family": "llama", "tie_embeddings": False,
    "rope_scaling": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},  # puts head_dim 8's bands in all three regimes
}


def build(make_model, tokenizer, name: str):
    extra = dict(VARIANTS[name])
    family = extra.pop("family", name)
    return make_model(family, vocab_size=tokenizer.vocab_size, init_std=0.1, **extra)


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", VARIANTS)
def test_save_and_load_reproduce_the_model_exactly(make_model, tokenizer, tmp_path, name):
    model = build(make_model, tokenizer, name)
    out = save_model_dir(model, tokenizer, tmp_path / "m")
    loaded = lmforge.load(out)
    # The architecture comes back (defaults resolved; initializer_range is not read back, it only matters at init).
    same = {"initializer_range": model.config.init_std}
    assert {**to_hf_config(loaded.config), **same} == {**to_hf_config(model.config), **same}
    x = probe(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.tokenizer.encode("1. The king") == tokenizer.encode("1. The king")
    assert loaded.meta["parameters"] == model.num_params()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left


QWEN2_TOKENIZER = pytest.mark.xfail(
    strict=True, reason="transformers 5 forces Qwen2Tokenizer for model_type qwen2 whatever tokenizer_config.json "
    "says, and it replaces our byte-level pre-tokenizer with Qwen's regex, so the ids differ")


@pytest.mark.parametrize("name", [pytest.param(n, marks=QWEN2_TOKENIZER) if n == "qwen2" else n for n in VARIANTS])
def test_our_model_directory_loads_in_transformers_with_the_same_logits(make_model, tokenizer, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    model = build(make_model, tokenizer, name)
    out = save_model_dir(model, tokenizer, tmp_path / "m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = probe(tokenizer.vocab_size)
    with torch.no_grad():
        expected = model(x)
        got = theirs(x).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert theirs.num_parameters() == model.num_params()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Chapter 7.\n1. The queen forgives 字 🚀"
    assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_saving_over_an_existing_directory_is_atomic(make_model, tokenizer, tmp_path, monkeypatch):
    first = make_model("llama", vocab_size=tokenizer.vocab_size, seed=1)
    out = save_model_dir(first, tokenizer, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()

    import lmforge.model_dir as model_dir

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_dir, "write_model_files", fail)
    with pytest.raises(RuntimeError):
        save_model_dir(make_model("llama", vocab_size=tokenizer.vocab_size, seed=2), tokenizer, out)
    assert (out / "model.safetensors").read_bytes() == before  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # and no staging folder is left


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(KeyError), atomic_directory(target) as staging:
        (staging / "a").write_text("2")
        raise KeyError("boom")
    assert (target / "a").read_text() == "1"
    with atomic_directory(target) as staging:
        (staging / "b").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and sorted(p.name for p in target.iterdir()) == ["b"]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "copy")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


BROKEN = {
    "missing directory": (lambda d: shutil.rmtree(d), "not found"),
    "missing config.json": (lambda d: (d / "config.json").unlink(), "config.json"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{model_type: llama"), "not valid JSON"),
    "config.json lacks a key": (lambda d: edit_config(d, num_attention_heads=None), "config"),
    "unsupported model_type": (lambda d: edit_config(d, model_type="bert"), "bert"),
    "truncated model.safetensors": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
        "model.safetensors"),
    "garbage model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "pickle-only weights": (lambda d: (torch.save({}, d / "pytorch_model.bin"), (d / "model.safetensors").unlink()),
                            "pickle"),
    "config shapes disagree with weights": (lambda d: edit_config(d, intermediate_size=96), "shape"),
    "config has more layers than the weights": (lambda d: edit_config(d, num_hidden_layers=3), "missing"),
    "config has fewer layers than the weights": (lambda d: edit_config(d, num_hidden_layers=1), "does not use"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_model_directories_are_clear_errors(model_copy, case):
    breaks, message = BROKEN[case]
    breaks(model_copy)
    with pytest.raises(LmforgeError, match=message) as info:
        lmforge.load(model_copy)
    assert "\n" not in str(info.value)
