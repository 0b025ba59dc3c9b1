"""Every built-in fine-tuning recipe validates, and runs (shrunk to a few steps on a tiny base)
with its shipped sample data."""

from __future__ import annotations

import pytest
from helpers import save_random_model, small_tokenizer

from lmforge.train.finetune import builtin_finetune_recipes, finetune, load_finetune_config

SHRINK = {"train": {"max_steps": 2, "warmup": 1, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                    "device": "cpu"}, "eval": {"every": 2, "batches": 1}}


def test_the_recipes_are_there():
    assert {"lora-sft", "full-sft", "qlora-sft", "dpo", "classify", "tag", "mlm"} <= set(builtin_finetune_recipes())


@pytest.mark.parametrize("name", sorted(builtin_finetune_recipes()))
def test_recipe_runs_shrunk(name, tmp_path, tiny_data):
    cfg = load_finetune_config(name)
    over = {**SHRINK, "run": {"out": str(tmp_path / "runs")}}
    if cfg.base is not None:
        tok = small_tokenizer()
        over["base"] = str(save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size))
    else:
        over["data"] = {"train": str(tiny_data)}
        over["model"] = {"n_layer": 1, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32}
    from lmforge.config import deep_merge

    cfg = load_finetune_config(None, deep_merge(cfg.model_dump(mode="json", exclude_none=True), over))
    result = finetune(cfg, progress=False, log=lambda s: None)
    assert result.steps == 2 and result.output.is_dir()
