"""The six application recipes: their data and held-out task files, and each one end to end on
a tiny model (evaluate, fine-tune 2 steps, evaluate again: the before/after report)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import save_random_model, small_tokenizer

from lmforge.applications import APPLICATIONS, HEADLINE, before_after, before_after_table, label_scores, task_file
from lmforge.eval.task_file import load_task
from lmforge.train.finetune import builtin_finetune_recipes, load_finetune_config

TYPES = {"translate": "generation", "summarize": "generation", "code-completion": "code",
         "relation-extraction": "extraction", "sentiment": "multiple_choice", "support-chat": "generation"}
METRICS = {"translate": {"bleu", "chrf"}, "summarize": {"rouge1", "rouge2", "rougeL"},
           "code-completion": {"pass@1", "pass@5"},
           "relation-extraction": {"triple_precision", "triple_recall", "triple_f1", "parsed"},
           "sentiment": {"accuracy", "macro_f1"}, "support-chat": {"rougeL", "exact_match"}}


def _train_inputs(name: str) -> set[str]:
    """What the recipe trains on, as the eval file's contexts would show it."""
    path = load_finetune_config(name).data.train
    seen = set()
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        seen.add(row.get("prompt") or row.get("text") or row["messages"][0]["content"])
    return seen


@pytest.mark.parametrize("name", APPLICATIONS)
def test_recipe_data_is_bilingual_and_held_out(name):
    assert name in builtin_finetune_recipes()
    cfg = load_finetune_config(name)
    assert cfg.base == "runs/quickstart/model" and cfg.method == "full"
    task = load_task(task_file(name))
    assert task.type == TYPES[name] and len(task.examples) >= 16
    inputs = [ex.get("text") or ex.get("prompt") or ex["context"] for ex in task.examples]
    assert any(any("\u4e00" <= c <= "\u9fff" for c in s) for s in inputs)  # Chinese
    assert any(re.search(r"[A-Za-z]+ [A-Za-z]+ [A-Za-z]+", s) for s in inputs)  # and English sentences
    assert not set(inputs) & _train_inputs(name)  # nothing evaluated was trained on


def test_label_scores_by_hand():
    # gold P P N N, predicted P N N N: accuracy 3/4; F1(P) = 2/3, F1(N) = 4/5, macro 11/15.
    scores = label_scores(["positive", "negative", "negative", "negative"],
                          ["positive", "positive", "negative", "negative"])
    assert scores["accuracy"] == 0.75 and scores["macro_f1"] == pytest.approx(11 / 15)


@pytest.mark.slow
@pytest.mark.parametrize("name", APPLICATIONS)
def test_recipe_before_and_after_on_a_tiny_model(name, tmp_path):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, context=256)
    shrink = ["--train.max_steps=2", "--train.warmup=1", "--train.batch_size=4", "--train.checkpoint_every=2",
              "--eval.every=2", "--eval.batches=1", "--train.device=cpu"]
    lines = []
    row = before_after(name, base, tmp_path / "runs", shrink, limit=3, log=lines.append)
    assert row["steps"] == 2 and (tmp_path / "runs" / name).is_dir()
    for side in ("before", "after"):
        assert set(row[side]) >= METRICS[name], (side, row[side])
        assert all(0.0 <= v <= 1.0 for v in row[side].values())
    if name == "sentiment":  # the head's predictions after, the label words' likelihoods before
        assert (tmp_path / "runs" / name / "model" / "head.json").is_file()
    assert lines and lines[0].startswith(f"{name}: 2 steps") and HEADLINE[name] in lines[0]
    table = before_after_table([row])
    assert f"| {name} | {HEADLINE[name]} | {row['before'][HEADLINE[name]]:.4f} |" in table
