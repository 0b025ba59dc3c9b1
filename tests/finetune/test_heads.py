"""Task heads: metrics against hand counts, and heads that learn synthetic separable tasks
(> 90% accuracy, > 0.9 entity F1) on a causal backbone, in full and with LoRA."""

from __future__ import annotations

import json
import random

import pytest
from helpers import save_random_model, small_tokenizer, write_jsonl

from lmforge.config import deep_merge
from lmforge.errors import LmforgeError
from lmforge.model.heads import bio_spans, entity_f1, macro_f1
from lmforge.train.finetune import finetune, load_finetune_config

GOOD, BAD = ["good", "great", "fine"], ["bad", "awful", "poor"]
FILLER = ["the", "a", "film", "was", "very", "and", "to", "sea", "mind", "question"]
PEOPLE, PLACES = ["alice", "bob", "carol"], [["paris"], ["rome"], ["new", "york"]]


def test_metrics_by_hand():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC"]) == {(0, 2, "PER"), (3, 6, "LOC")}
    assert bio_spans(["I-LOC", "B-PER", "I-LOC"]) == {(0, 1, "LOC"), (1, 2, "PER"), (2, 3, "LOC")}
    scores = entity_f1([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-LOC", ][:2] + ["O"]])
    assert scores["entity_precision"] == 0.5 and scores["entity_recall"] == 1.0
    assert abs(scores["entity_f1"] - 2 / 3) < 1e-9
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)


def sentiment_rows(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label == "pos" else BAD))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def ner_rows(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            if r < 0.2:
                tokens.append(rng.choice(PEOPLE))
                tags.append("B-PER")
            elif r < 0.4:
                place = rng.choice(PLACES)
                tokens += place
                tags += ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def head_config(tmp_path, base, task, train, val, over=None):
    raw = {"base": str(base), "task": task, "data": {"train": str(train), "val": str(val)},
           "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 60, "warmup": 5, "checkpoint_every": 1000,
                     "log_every": 10, "device": "cpu"},
           "eval": {"every": 30, "batches": 50}, "run": {"name": task, "out": str(tmp_path / "runs")}}
    return load_finetune_config(None, deep_merge(raw, over or {}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = small_tokenizer()
    return save_random_model(tmp_path_factory.mktemp("base") / "m", "llama", tokenizer=tok,
                             vocab_size=tok.vocab_size, init_std=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sequence_classifier_learns_a_separable_task(tmp_path, base, method):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(400, 0))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(100, 1))
    over = {"method": method, **({"train": {"lr": 1e-2, "max_steps": 150}} if method == "lora" else {})}
    result = finetune(head_config(tmp_path, base, "classify", train, val, over), progress=False, log=lambda s: None)
    assert result.metrics["accuracy"] > 0.9 and result.metrics["macro_f1"] > 0.9
    head = json.loads((result.output / "head.json").read_text())
    assert head["labels"] == ["neg", "pos"] and (result.output / "head.safetensors").is_file()
    from lmforge.train.classify import load_task_model

    tuned = load_task_model(result.output)
    rows = sentiment_rows(40, 7)
    predicted = tuned.classify([r["text"] for r in rows])
    assert sum(p == r["label"] for p, r in zip(predicted, rows)) >= 36


@pytest.mark.slow
def test_token_classifier_reaches_entity_f1(tmp_path, base):
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(400, 0))
    val = write_jsonl(tmp_path / "val.jsonl", ner_rows(100, 1))
    result = finetune(head_config(tmp_path, base, "tag", train, val, {"train": {"max_steps": 90}}), progress=False,
                      log=lambda s: None)
    assert result.metrics["entity_f1"] > 0.9
    from lmforge.train.classify import load_task_model

    rows = ner_rows(20, 7)
    predicted = load_task_model(result.output).tag([r["tokens"] for r in rows])
    correct = sum(p == g for r, pred in zip(rows, predicted) for p, g in zip(pred, r["tags"]))
    assert correct >= 0.9 * sum(len(r["tags"]) for r in rows)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("entity_f1" in r for r in records) >= 2  # reported at every evaluation


def test_labels_outside_the_label_set_are_errors(tmp_path, base):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 0))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "so so", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    with pytest.raises(LmforgeError, match="val.jsonl line 2: label 'mixed' is not in the label set"):
        finetune(head_config(tmp_path, base, "classify", train, val), progress=False, log=lambda s: None)
    with pytest.raises(LmforgeError, match="line 1: label 'neg' is not in the label set"):
        cfg = head_config(tmp_path, base, "classify", train, val, {"data": {"labels": ["pos", "mixed"]}})
        finetune(cfg, progress=False, log=lambda s: None)
    bad_tags = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(LmforgeError, match="line 1: 2 tokens but 1 tags"):
        finetune(head_config(tmp_path, base, "tag", bad_tags, bad_tags), progress=False, log=lambda s: None)
