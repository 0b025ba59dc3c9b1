"""DPO: the chosen-over-rejected reward margin rises over training, in full and with LoRA."""

from __future__ import annotations

import json
import random

import pytest
from helpers import save_random_model, small_tokenizer, write_jsonl

from lmforge.config import deep_merge
from lmforge.errors import LmforgeError
from lmforge.train.finetune import finetune, load_finetune_config

WORDS = ["red", "green", "blue", "sea", "mind", "world"]


def preference_rows(n: int, seed: int):
    """Prefer answering with the word asked for over another word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w, other = rng.sample(WORDS, 2)
        rows.append({"prompt": f"say {w}:", "chosen": f" {w}", "rejected": f" {other}"})
    return rows


def dpo_config(tmp_path, base, train, val, over=None):
    raw = {"base": str(base), "task": "dpo", "data": {"train": str(train), "val": str(val)},
           "dpo": {"beta": 0.5},
           "train": {"batch_size": 8, "lr": 3e-3, "max_steps": 30, "warmup": 2, "checkpoint_every": 1000,
                     "log_every": 5, "device": "cpu"},
           "eval": {"every": 10, "batches": 10}, "run": {"name": "dpo", "out": str(tmp_path / "runs")}}
    return load_finetune_config(None, deep_merge(raw, over or {}))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_raises_the_margin(tmp_path, method):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(128, 0))
    val = write_jsonl(tmp_path / "val.jsonl", preference_rows(32, 1))
    over = {"method": method, **({"train": {"lr": 1e-2}} if method == "lora" else {})}
    result = finetune(dpo_config(tmp_path, base, train, val, over), progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert len(margins) >= 3 and margins[-1] > margins[0] and margins[-1] > 0.5
    assert result.metrics["preference_accuracy"] > 0.8


def test_dpo_bad_input(tmp_path):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b"}])
    with pytest.raises(LmforgeError, match="line 2: expected string fields"):
        finetune(dpo_config(tmp_path, base, bad, bad), progress=False, log=lambda s: None)
