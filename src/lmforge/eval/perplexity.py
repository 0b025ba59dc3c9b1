"""Perplexity and bits-per-byte, on a prepared validation split or on a text file.

Bits per byte divides the total negative log-likelihood by the text's UTF-8 size, so
models with different tokenizers can be compared; perplexity is per token.

A bidirectional (masked-LM) encoder has no left-to-right likelihood: scored as a causal
model it would see each token it predicts. It gets the pseudo-perplexity instead (Salazar
et al., 2020, "Masked Language Model Scoring"): each token is masked in turn and predicted
from all the others, one forward pass per token, so it costs a window's length times a
causal evaluation. The result says which it is (`measure`); the two are not comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.loader import TokenSplit, sequential_windows
from lmforge.data.tokenizer import TextTokenizer, mask_token_id
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train.losses import chunked_cross_entropy


PERPLEXITY, PSEUDO = "perplexity", "pseudo-perplexity"


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood per token, nats
    perplexity: float
    bits_per_byte: float
    tokens: int
    measure: str = PERPLEXITY  # or PSEUDO: each token predicted from both sides (an encoder)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, total_nll: float, tokens: int, bytes_per_token: float, measure: str = PERPLEXITY) -> "EvalResult":
        """The result of `tokens` tokens scored `total_nll` nats in all."""
        loss = total_nll / max(1, tokens)
        return cls(loss, math.exp(min(loss, 50.0)), loss / math.log(2) / bytes_per_token, tokens, measure)


# Logits held at once while scoring: a batch of 8 x 1,024 tokens over GPT-2's 50,257-token
# vocabulary is 1.6 GB of logits (and as much again for their log-softmax) in one piece.
LOGITS_BYTES = 64 << 20


@torch.no_grad()
def _score_windows(model: Transformer, windows, autocast=None) -> tuple[float, int]:
    device = model.tok_emb.weight.device
    head = model.lm_head
    # A plain output layer is applied a slice of rows at a time (what training's chunked loss
    # does); another one (a quantized lm_head, soft-capped logits) gets the whole logits from the model.
    plain = (type(head) is torch.nn.Linear and head.bias is None and getattr(head, "soft_cap", None) is None
             and not getattr(head, "vocab_parallel", False))  # tensor parallelism: logits sharded by vocabulary
    rows = max(1, LOGITS_BYTES // (4 * head.out_features)) if plain else 0
    total, count = 0.0, 0
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            if rows:
                hidden = model(x, return_hidden=True).flatten(0, 1)
                total += chunked_cross_entropy(hidden, head.weight, y.flatten(), rows, reduction="sum").item()
            else:
                logits = model(x)
                total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total, count


# Pseudo-perplexity scores masked copies of a window in passes as large as a batch of this
# many full-context windows.
PSEUDO_PASS_WINDOWS = 8


@torch.no_grad()
def _pseudo_score_windows(model: Transformer, windows, mask_id: int) -> tuple[float, int]:
    """Pseudo-log-likelihood: every token of every window masked in turn, predicted from the rest."""
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    for x, _ in windows:
        for row in x.to(device):
            T = len(row)
            per_pass = max(1, PSEUDO_PASS_WINDOWS * model.config.context // T)
            for start in range(0, T, per_pass):
                positions = torch.arange(start, min(T, start + per_pass), device=device)
                copies = row.repeat(len(positions), 1)
                picked = torch.arange(len(positions), device=device)
                copies[picked, positions] = mask_id
                hidden = model(copies, return_hidden=True)[picked, positions]
                logp = model.lm_head(hidden).float().log_softmax(-1)
                total -= logp[picked, row[positions]].sum().item()
            count += T
    return total, count


def _score(model: Transformer, windows, mask_id: int | None, autocast=None) -> tuple[float, int, str]:
    """(total negative log-likelihood, tokens, measure): the causal score, or an encoder's pseudo one."""
    if model.config.causal:
        return (*_score_windows(model, windows, autocast), PERPLEXITY)
    if mask_id is None:
        raise LmforgeError("this model is a masked-LM encoder (bidirectional): it has no left-to-right perplexity, "
                           "and its pseudo-perplexity needs its tokenizer's mask token")
    with autocast or torch.autocast("cpu", enabled=False):
        return (*_pseudo_score_windows(model, windows, mask_id), PSEUDO)


def encoder_mask_id(model: Transformer, tokenizer: TextTokenizer) -> int | None:
    """The mask token an encoder was trained with (None for a causal model, which needs none)."""
    return None if model.config.causal else mask_token_id(tokenizer)


def evaluate_split(model: Transformer, split: TokenSplit, batch_size: int = 8, max_batches: int | None = None,
                   seq_len: int | None = None, autocast=None, mask_id: int | None = None) -> EvalResult:
    """Perplexity on a prepared split; an encoder's pseudo-perplexity, given its `mask_id`."""
    was_training = model.training
    model.eval()
    seq_len = min(seq_len or model.config.context, split.tokens - 1)
    try:
        total, count, measure = _score(model, sequential_windows(split, seq_len, batch_size, max_batches), mask_id,
                                       autocast)
    finally:
        model.train(was_training)
    return EvalResult.of(total, count, split.bytes_per_token, measure)


def evaluate_text(model: Transformer, tokenizer: TextTokenizer, path: str | Path, batch_size: int = 8) -> EvalResult:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"evaluation file {path} not found") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text") from None
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise LmforgeError(f"{path} is too short to evaluate (needs at least 2 tokens)")
    seq_len = min(model.config.context, len(ids) - 1)
    windows = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start:start + seq_len + 1]
        if len(chunk) >= 2:
            windows.append((torch.tensor([chunk[:-1]]), torch.tensor([chunk[1:]])))
    model.eval()
    total, count, measure = _score(model, windows, encoder_mask_id(model, tokenizer))
    return EvalResult.of(total, count, len(text.encode("utf-8")) / count, measure)


def unigram_baseline(train: TokenSplit, val: TokenSplit) -> EvalResult:
    """The perplexity of predicting every token by its training frequency (add-one smoothed)."""
    counts = np.ones(train.vocab_size, dtype=np.float64)
    for shard in train.shards:
        counts += np.bincount(np.asarray(shard), minlength=train.vocab_size)[: train.vocab_size]
    logp = np.log(counts / counts.sum())
    total = 0.0
    for shard in val.shards:
        total -= logp[np.asarray(shard, dtype=np.int64)].sum()
    return EvalResult.of(float(total), val.tokens, val.bytes_per_token)
