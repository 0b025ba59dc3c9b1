"""Task heads on any lmforge backbone: sequence classification and token classification (tagging),
and the metrics they are judged by (accuracy, macro-F1, entity-level F1 over BIO tags).

A head reads `Transformer.hidden_states`. A causal backbone summarizes a sequence in its last
token (the only one that has seen all the others); a bidirectional encoder by the mean over
its tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.model.pooling import pool


class SequenceClassifier(nn.Module):
    def __init__(self, d_model: int, n_labels: int, pooling: str = "last", dropout: float = 0.0):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError("pooling must be 'last' or 'mean'")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(d_model, n_labels)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), lengths (B,) of the unpadded rows -> logits (B, n_labels)."""
        return self.score(self.dropout(pool(hidden, lengths, self.pooling)))


class TokenClassifier(nn.Module):
    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(d_model, n_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, n_labels)."""
        return self.score(self.dropout(hidden))


# ----------------------------------------------------------------------------- metrics

def accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))


def macro_f1(pred: list[int], gold: list[int], n_labels: int) -> float:
    """The mean over labels (those that occur in gold or predictions) of per-label F1."""
    scores = []
    for label in range(n_labels):
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        fp = sum(p == label and g != label for p, g in zip(pred, gold))
        fn = sum(p != label and g == label for p, g in zip(pred, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


def bio_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entities (start, end exclusive, type) of a BIO sequence; an I- without its B- starts one (as conlleval)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and kind == typ and start is not None
        if start is not None and not continues:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = i, typ
    return spans


def entity_f1(pred: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1: an entity counts only with its exact span and type."""
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        ps, gs = bio_spans(p), bio_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
