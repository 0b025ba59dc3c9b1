"""Helpers for the fine-tuning tests: tiny models saved as model directories, JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir

TEXT = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
        "user assistant system hello world yes no red green blue"] * 20


def small_tokenizer(vocab: int = 320):
    return train_tokenizer(TEXT, vocab)


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    fields = dict(family=family, vocab_size=320, n_layer=2, n_head=4, d_model=32, context=64)
    if family != "gpt2":
        fields["n_kv_head"] = 2
    if family == "qwen2":
        fields["qkv_bias"] = True
    return ModelConfig(**{**fields, **overrides})


def random_model(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # random norms and biases, so a misplaced tensor cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save_random_model(folder: Path, family: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> Path:
    return save_model_dir(random_model(family, seed, **overrides), tokenizer or small_tokenizer(), folder)


def randomize_adapters(model, seed: int = 1, scale: float = 0.3) -> None:
    from lmforge.model.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
