"""`lmforge finetune --task embed`: contrastive fine-tuning on the shipped English + Chinese FAQ
pairs improves held-out retrieval; the saved pooling is what serving uses; LoRA keeps it in
adapter/; two torchrun processes (negatives gathered across them) equal one; bad data is one
line naming the record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_random_model, write_jsonl
from safetensors.torch import load_file

import lmforge
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.train.embed import Embedder, retrieval_metrics
from lmforge.train.finetune import RECIPES, finetune, load_finetune_config
from lmforge.train.metrics import read_metrics

PAIRS = RECIPES / "data" / "embed.jsonl"


def pairs() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random 2-layer base whose tokenizer knows the pairs' English and Chinese."""
    texts = [r[k] for r in pairs() for k in ("query", "positive")]
    tok = train_tokenizer(texts, 600)
    return save_random_model(tmp_path_factory.mktemp("embed-base") / "m", "llama", tokenizer=tok,
                             vocab_size=tok.vocab_size, context=96, init_std=0.2)


def config(tmp_path: Path, base: Path, **over):
    raw = {"base": str(base), "task": "embed", "data": {"train": str(PAIRS), "val_fraction": 0.2},
           "train": {"batch_size": 16, "lr": 2e-3, "max_steps": 60, "warmup": 5, "checkpoint_every": 1000,
                     "log_every": 10, "device": "cpu", "dtype": "float32"},
           "eval": {"every": 1000, "batches": 20}, "run": {"name": "embed", "out": str(tmp_path / "runs")}}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return load_finetune_config(None, raw)


@pytest.mark.slow
def test_contrastive_tuning_improves_held_out_retrieval_and_saves_its_pooling(tmp_path, base):
    logs: list[str] = []
    result = finetune(config(tmp_path, base, embed={"pooling": "mean", "matryoshka": [16]},
                             train={"max_steps": 120, "lr": 3e-3}), progress=False, log=logs.append)
    record = json.loads((result.output / "embedding.json").read_text())
    before, after = record["held_out"]["before"], record["held_out"]["after"]
    assert record["pooling"] == "mean" and record["dimensions"] == [16] and record["held_out"]["pairs"] == 38
    assert any("held-out retrieval before training" in line for line in logs)
    # A random 2-layer base learns which words tie questions to answers; held-out pairs are unseen.
    assert after["mrr"] > before["mrr"] + 0.1 and after["recall_at_1"] > before["recall_at_1"] + 0.05, record
    assert after == result.metrics
    # The saved model, embedded as a server would (Embedder.of reads embedding.json), gives those figures.
    model = lmforge.load(result.output)
    embed = Embedder.of(model)
    assert embed.pooling == "mean" and embed.dimensions == [16, 32]
    from lmforge.data.sft import read_jsonl, split_validation

    _, val = split_validation(read_jsonl(PAIRS), 0.2, 0)
    queries = embed.embed([o["query"] for _, o in val], batch_size=16)  # as the evaluation batches them
    corpus = embed.embed([o["positive"] for _, o in val] + [o["negative"] for _, o in val if "negative" in o],
                         batch_size=16)
    again = retrieval_metrics(queries, corpus, list(range(len(val))))
    assert again["recall_at_1"] == pytest.approx(after["recall_at_1"], abs=1e-6)
    assert again["mrr"] == pytest.approx(after["mrr"], abs=1e-4)
    short = embed.embed(["如何恢复中断的训练？"], dimensions=16)
    assert short.shape == (1, 16) and float(short.norm()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(LmforgeError, match="may be 16, 32 long, not 20"):
        embed.embed(["x"], dimensions=20)


def test_lora_keeps_the_pooling_with_the_adapter_and_the_server_uses_it(tmp_path, base):
    from fastapi.testclient import TestClient

    from lmforge.adapters import apply_adapter
    from lmforge.serve.command import build_app
    from lmforge.serve.settings import ServeSettings

    result = finetune(config(tmp_path, base, method="lora", embed={"pooling": "last"}, train={"max_steps": 4}),
                      progress=False, log=lambda s: None)
    assert result.output.name == "adapter"
    assert json.loads((result.output / "embedding.json").read_text())["pooling"] == "last"
    assert json.loads((result.output / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    merged = apply_adapter(lmforge.load(base), result.output, merge=True)
    texts = ["How do I resume an interrupted training run?", "如何把模型转换成 GGUF？"]
    expected = Embedder.of(merged, result.output).embed(texts)
    app = build_app(base, ServeSettings(model_name="embedder"), adapter=result.output)
    with TestClient(app) as client:
        got = client.post("/v1/embeddings", json={"model": "embedder", "input": texts}).json()
    assert torch.allclose(torch.tensor([d["embedding"] for d in got["data"]]), expected, atol=1e-6)
    plain = Embedder(merged.model, merged.tokenizer, "mean").embed(texts)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the pooling mattered


WORKER = """
import json, sys
from lmforge.train.finetune import finetune, load_finetune_config
finetune(load_finetune_config(None, json.loads(sys.argv[1])), progress=False, log=lambda *a: None)
"""


@pytest.mark.slow
def test_two_processes_gather_the_negatives_and_equal_one(tmp_path, base):
    """Each process embeds half of every batch; the positives and negatives of both are the
    negatives of each query, with gradients flowing back to the process that embedded them."""
    rows = pairs()[:48]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def raw(name: str) -> dict:
        cfg = config(tmp_path, base, data={"train": str(data), "val_fraction": 0.25},
                     train={"batch_size": 8, "max_steps": 4, "log_every": 1}, eval={"every": 2, "batches": 5},
                     run={"name": name, "out": str(tmp_path / "runs")})
        return cfg.model_dump(mode="json")

    (tmp_path / "worker.py").write_text(WORKER)
    finetune(load_finetune_config(None, raw("one")), progress=False, log=lambda s: None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), json.dumps(raw("two"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_metrics(tmp_path / "runs" / n) for n in ("one", "two"))
    losses = [[r["loss"] for r in m if "loss" in r] for m in (one, two)]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-4)
    a, b = (load_file(str(tmp_path / "runs" / n / "model" / "model.safetensors")) for n in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    shutil.rmtree(tmp_path / "runs")


@pytest.mark.parametrize("row, words", [
    ({"query": "q", "positive": ""}, "line 2: expected a non-empty string field 'positive'"),
    ({"question": "q", "positive": "p"}, "line 2: expected a non-empty string field 'query'"),
    ({"query": "q", "positive": "p", "negative": ["n1"]}, "line 2: 'negative', when given, must be a non-empty string"),
])
def test_bad_records_are_one_line_naming_them(tmp_path, base, row, words):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"query": "a", "positive": "b"}, row, {"query": "c", "positive": "d"}])
    with pytest.raises(LmforgeError, match=words.replace("(", r"\(").replace("[", r"\[")):
        finetune(config(tmp_path, base, data={"train": str(data), "val_fraction": 0.0}), progress=False,
                 log=lambda s: None)


def test_settings_are_checked(tmp_path, base):
    with pytest.raises(LmforgeError, match="embed.temperature must be more than 0"):
        config(tmp_path, base, embed={"temperature": 0})
    with pytest.raises(LmforgeError, match="pooling"):
        config(tmp_path, base, embed={"pooling": "max"})
    with pytest.raises(LmforgeError, match=r"embed.matryoshka \[32\] must be below the model's width 32"):
        finetune(config(tmp_path, base, embed={"matryoshka": [32]}), progress=False, log=lambda s: None)
    one = write_jsonl(tmp_path / "one.jsonl", [{"query": "a", "positive": "b"}])
    with pytest.raises(LmforgeError, match="at least two pairs"):
        finetune(config(tmp_path, base, data={"train": str(one), "val_fraction": 0.0}), progress=False,
                 log=lambda s: None)
