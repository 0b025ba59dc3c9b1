"""Perplexity and bits per byte, checked against hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.loader import TokenSplit
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import evaluate_split, evaluate_text, unigram_baseline


@pytest.fixture(scope="module")
def val(tiny_data) -> TokenSplit:
    return TokenSplit(tiny_data, "val")


def test_split_loss_is_the_mean_token_cross_entropy(make_model, val):
    model = make_model("llama", vocab_size=val.vocab_size)
    result = evaluate_split(model, val, batch_size=3, max_batches=2, seq_len=32)
    tokens = torch.from_numpy(np.asarray(val.shards[0][:6 * 32 + 1], dtype=np.int64))
    x, y = tokens[:-1].view(6, 32), tokens[1:].view(6, 32)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert result.tokens == 6 * 32
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) * val.tokens / val.bytes, rel=1e-5)
    assert not model.training


def test_scoring_a_slice_of_rows_at_a_time_gives_the_whole_logits_loss(make_model, val, monkeypatch):
    # Logits are made LOGITS_BYTES at a time: 10 rows here, so 6 x 32 targets take 20 slices
    # (the last one short); a quantized output layer takes the whole-logits path.
    from lmforge.compress.quantize import quantize_model
    from lmforge.eval import perplexity

    model = make_model("llama", vocab_size=val.vocab_size)
    whole = evaluate_split(model, val, batch_size=3, max_batches=2, seq_len=32)
    monkeypatch.setattr(perplexity, "LOGITS_BYTES", 4 * val.vocab_size * 10)
    sliced = evaluate_split(model, val, batch_size=3, max_batches=2, seq_len=32)
    assert sliced.tokens == whole.tokens == 6 * 32
    assert sliced.loss == pytest.approx(whole.loss, rel=1e-6)
    quantized = quantize_model(copy.deepcopy(model), "int8", 32)
    assert type(quantized.lm_head) is not torch.nn.Linear
    assert evaluate_split(quantized, val, batch_size=3, max_batches=2, seq_len=32).loss == pytest.approx(whole.loss, rel=0.02)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary(make_model, val):
    model = make_model("gpt2", vocab_size=val.vocab_size)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: a uniform distribution
    result = evaluate_split(model, val, batch_size=4, max_batches=2, seq_len=32)
    assert result.loss == pytest.approx(math.log(val.vocab_size), rel=1e-6)
    assert result.perplexity == pytest.approx(val.vocab_size, rel=1e-5)


def test_evaluation_restores_training_mode(make_model, val):
    model = make_model("llama", vocab_size=val.vocab_size).train()
    evaluate_split(model, val, batch_size=2, max_batches=1, seq_len=16)
    assert model.training


def test_text_file_evaluation_matches_a_hand_computation(make_model, tokenizer, tmp_path):
    model = make_model("llama", vocab_size=tokenizer.vocab_size)
    text = "Chapter 1.\n1. The king loves the sea.\n2. A fool fears the night!\n" * 3
    path = tmp_path / "eval.txt"
    path.write_text(text)
    result = evaluate_text(model, tokenizer, path)
    ids = tokenizer.encode(text)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):  # windows of the context, each token scored once
            chunk = torch.tensor([ids[start:start + 33]])
            total += F.cross_entropy(model(chunk[:, :-1])[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    assert result.tokens == count == len(ids) - 1
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), (b"\xff\xfe bad", "not UTF-8"),
                                                  (b"a", "too short")])
def test_bad_evaluation_files_are_clear_errors(make_model, tokenizer, tmp_path, content, message):
    path = tmp_path / "eval.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message):
        evaluate_text(make_model("llama", vocab_size=tokenizer.vocab_size), tokenizer, path)


def test_unigram_baseline_matches_counts(tiny_data, val):
    train = TokenSplit(tiny_data, "train")
    counts = np.bincount(np.asarray(train.shards[0]), minlength=train.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    expected = -logp[np.asarray(val.shards[0], dtype=np.int64)].mean()
    result = unigram_baseline(train, val)
    assert result.loss == pytest.approx(expected, rel=1e-9)
    assert result.tokens == val.tokens
    assert result.loss < math.log(val.vocab_size)
