"""The bidirectional encoder: attention sees both ways, its directory round-trips, masked-LM
pretraining (80/10/10) lowers the loss, and the encoder then fine-tunes with a classification head."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import random_model, save_random_model, write_jsonl

import lmforge
from lmforge.config import deep_merge
from lmforge.data.sft import IGNORE
from lmforge.errors import LmforgeError
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.mlm import mask_tokens


def test_encoder_attends_both_ways_and_round_trips(tmp_path):
    enc = random_model("llama", causal=False)
    dec = random_model("llama")
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 320
    with torch.no_grad():
        assert (enc(ids)[0, 0] - enc(changed)[0, 0]).abs().max() > 1e-4  # the first token sees the last
        assert torch.equal(dec(ids)[0, 0], dec(changed)[0, 0])  # the decoder's does not
        with pytest.raises(ValueError, match="does not decode with a KV cache"):
            enc(ids, kv_cache=enc.new_cache(1))
    folder = save_random_model(tmp_path / "enc", "llama", causal=False)
    assert json.loads((folder / "config.json").read_text())["lmforge_bidirectional"] is True
    assert lmforge.load(folder).config.causal is False


def test_masking_is_80_10_10():
    x = torch.randint(10, 500, (64, 256), generator=torch.Generator().manual_seed(0))
    inputs, targets = mask_tokens(x, mask_id=3, vocab=500, prob=0.15, generator=torch.Generator().manual_seed(1))
    picked = targets != IGNORE
    assert abs(picked.float().mean() - 0.15) < 0.01
    assert torch.equal(targets[picked], x[picked])
    masked = (inputs == 3) & picked
    kept = (inputs == x) & picked
    assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
    assert abs(kept.sum() / picked.sum() - 0.1) < 0.02  # (plus the few random draws of the same token)
    assert torch.equal(inputs[~picked], x[~picked])


def sentiment_rows(n: int, seed: int):
    rng = random.Random(seed)
    good, bad, filler = ["good", "great"], ["bad", "poor"], ["the", "a", "of", "and", "to", "was", "is"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(filler, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(good if label == "pos" else bad))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.mark.slow
def test_mlm_pretraining_then_classification(tmp_path, tiny_data):
    mlm = load_finetune_config(None, {
        "model": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "context": 32,
                  "causal": False},
        "task": "mlm", "data": {"train": str(tiny_data)},
        "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 60, "warmup": 5, "checkpoint_every": 1000,
                  "log_every": 10, "device": "cpu"},
        "eval": {"every": 20, "batches": 4}, "run": {"name": "mlm", "out": str(tmp_path / "runs")}})
    result = finetune(mlm, progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < 0.8 * losses[0] and vals[-1] < vals[0]
    encoder = result.output
    assert lmforge.load(encoder).config.causal is False

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(300, 0))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(100, 1))
    classify = load_finetune_config(None, deep_merge(mlm.model_dump(exclude={"model", "mlm", "data"}), {
        "base": str(encoder), "task": "classify", "data": {"train": str(train), "val": str(val)},
        "train": {"max_steps": 60, "lr": 3e-3}, "run": {"name": "cls"}}))
    tuned = finetune(classify, progress=False, log=lambda s: None)
    assert tuned.metrics["accuracy"] > 0.9
    assert json.loads((tuned.output / "head.json").read_text())["pooling"] == "mean"


def test_mlm_needs_an_encoder(tmp_path, tiny_data):
    base = save_random_model(tmp_path / "dec", "llama", vocab_size=512)
    cfg = load_finetune_config(None, {"base": str(base), "task": "mlm", "data": {"train": str(tiny_data)},
                                      "run": {"out": str(tmp_path / "runs")}})
    with pytest.raises(LmforgeError, match="needs a bidirectional encoder"):
        finetune(cfg, progress=False, log=lambda s: None)
    with pytest.raises(LmforgeError, match="only task mlm builds a model from scratch"):
        load_finetune_config(None, {"model": {"causal": False}, "task": "sft", "data": {"train": "x"}})
