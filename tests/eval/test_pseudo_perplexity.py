"""An encoder's pseudo-perplexity: each token masked in turn and predicted from both sides."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.data.loader import TokenSplit
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import PERPLEXITY, PSEUDO, encoder_mask_id, evaluate_split, evaluate_text
from lmforge.model import Transformer


@pytest.fixture
def encoder(make_config, tokenizer):
    torch.manual_seed(0)
    return Transformer(make_config(vocab_size=tokenizer.vocab_size, causal=False)).eval()


def reference_pseudo_nll(model, ids: list[int], mask_id: int) -> float:
    """The definition, one full forward pass per token."""
    total = 0.0
    with torch.no_grad():
        for i, token in enumerate(ids):
            masked = torch.tensor([ids])
            masked[0, i] = mask_id
            total -= model(masked)[0, i].float().log_softmax(-1)[token].item()
    return total


def test_pseudo_perplexity_is_the_masked_one_token_at_a_time_likelihood(encoder, tokenizer, tmp_path):
    text = "Chapter 3.\n1. The queen serves the crown. 2. The fool sings to the king.\n"
    (tmp_path / "some.txt").write_text(text)
    result = evaluate_text(encoder, tokenizer, tmp_path / "some.txt")
    ids = tokenizer.encode(text)[:-1]  # the scored inputs: every token but the last (the causal layout)
    assert result.measure == PSEUDO and result.tokens == len(ids) > 8  # several passes of masked copies
    mask_id = encoder_mask_id(encoder, tokenizer)
    assert result.loss == pytest.approx(reference_pseudo_nll(encoder, ids, mask_id) / len(ids), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_a_prepared_split_needs_the_mask_token(encoder, tokenizer, tiny_data):
    split = TokenSplit(tiny_data, "val")
    with pytest.raises(LmforgeError, match="masked-LM encoder"):
        evaluate_split(encoder, split, max_batches=1, seq_len=16)
    result = evaluate_split(encoder, split, batch_size=2, max_batches=1, seq_len=16,
                            mask_id=encoder_mask_id(encoder, tokenizer))
    assert result.measure == PSEUDO and result.tokens == 32


def test_a_causal_model_keeps_its_perplexity(make_model, tokenizer, tmp_path):
    model = make_model(vocab_size=tokenizer.vocab_size)
    (tmp_path / "some.txt").write_text("1. The queen serves the crown.\n")
    assert encoder_mask_id(model, tokenizer) is None
    assert evaluate_text(model, tokenizer, tmp_path / "some.txt").measure == PERPLEXITY
