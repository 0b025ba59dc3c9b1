"""Metrics for generated text and code: exact match, token F1, BLEU, chrF, ROUGE, pass@k.

BLEU and chrF are sacrebleu's (corpus-level, as published; its `zh` tokenizer when a
reference contains Han characters, else its default `13a`), ROUGE is rouge-score's (mean
F-measure over examples) with a tokenizer that keeps CJK text: rouge-score's own drops
every non-ASCII character, so a Chinese summary would have no tokens at all. Here each
CJK character is a token and other letter or digit runs are words, which on ASCII text
is exactly rouge-score's default tokenization.

Exact match and F1 follow SQuAD's normalisation (lowercase, no punctuation, no English
articles, whitespace collapsed), with CJK text split into characters, so "北 京。" and
"北京" are the same answer. pass@k is the unbiased estimator of Chen et al. (2021).

Every score is in [0, 1] (BLEU and chrF too, divided by 100), the best over an example's
references where it has several.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

from lmforge.errors import LmforgeError

# CJK ideographs (with extension A and compatibility), kana, CJK punctuation and full-width forms.
CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_TOKEN = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")
_CJK_OR_RUN = re.compile(f"[{CJK}]|[^{CJK}]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")

TEXT_METRICS = ("exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL")
CODE_METRICS = ("pass@k",)


def has_han(text: str) -> bool:
    return bool(_HAN.search(text))


def is_cjk(char: str) -> bool:
    return bool(re.fullmatch(f"[{CJK}]", char))


def normalize_answer(text: str) -> list[str]:
    """SQuAD's answer normalisation, as tokens: lowercase, punctuation (ASCII and Unicode)
    removed, articles a/an/the removed, split on whitespace, CJK characters one token each."""
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c
                   for c in text.lower())
    text = _ARTICLES.sub(" ", text)
    return [t for word in text.split() for t in _CJK_OR_RUN.findall(word)]


def exact_match(prediction: str, references: Sequence[str]) -> float:
    ours = normalize_answer(prediction)
    return float(any(ours == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1: harmonic mean of token precision and recall, best over references."""
    ours = normalize_answer(prediction)
    best = 0.0
    for ref in references:
        theirs = normalize_answer(ref)
        if not ours or not theirs:
            best = max(best, float(ours == theirs))
            continue
        same = sum((Counter(ours) & Counter(theirs)).values())
        if same:
            p, r = same / len(ours), same / len(theirs)
            best = max(best, 2 * p * r / (p + r))
    return best


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; a shorter list is padded with None
    (sacrebleu's marker for 'no reference here')."""
    width = max(len(r) for r in references)
    return [[r[i] if i < len(r) else None for r in references] for i in range(width)]


def bleu_tokenizer(references: Sequence[Sequence[str]]) -> str:
    return "zh" if any(has_han(r) for refs in references for r in refs) else "13a"


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus BLEU, sentence BLEU per example), in [0, 1]."""
    from sacrebleu.metrics import BLEU

    corpus = BLEU(tokenize=bleu_tokenizer(references))
    sentence = BLEU(tokenize=bleu_tokenizer(references), effective_order=True)
    score = corpus.corpus_score(list(predictions), _reference_streams(references)).score / 100
    return score, [sentence.sentence_score(p, list(r)).score / 100 for p, r in zip(predictions, references)]


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus chrF, sentence chrF per example), in [0, 1]. chrF works on characters, so it
    needs no tokenizer for Chinese."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score(list(predictions), _reference_streams(references)).score / 100
    return score, [metric.sentence_score(p, list(r)).score / 100 for p, r in zip(predictions, references)]


class CJKTokenizer:
    """rouge-score's tokenizer interface: CJK characters one token each, other words whole."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
          kinds: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, tuple[float, list[float]]]:
    """{kind: (mean F-measure, F-measure per example)}; with several references, the best."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(kinds), tokenizer=CJKTokenizer())
    per = {k: [] for k in kinds}
    for p, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), p)
        for k in kinds:
            per[k].append(scores[k].fmeasure)
    return {k: (sum(v) / max(len(v), 1), v) for k, v in per.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn from n passes | c of the n pass) = 1 - C(n-c, k) / C(n, k),
    as a product of k ratios (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise LmforgeError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_texts(metrics: Sequence[str], predictions: Sequence[str],
                references: Sequence[Sequence[str]]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(task-level scores, per-example scores) for the text metrics asked for."""
    task: dict[str, float] = {}
    per: list[dict[str, float]] = [{} for _ in predictions]

    def put(name: str, total: float, values: Sequence[float]) -> None:
        task[name] = total
        for row, v in zip(per, values):
            row[name] = v

    for m in metrics:
        if m in ("exact_match", "f1"):
            fn = exact_match if m == "exact_match" else token_f1
            values = [fn(p, r) for p, r in zip(predictions, references)]
            put(m, sum(values) / max(len(values), 1), values)
        elif m in ("bleu", "chrf"):
            put(m, *(bleu if m == "bleu" else chrf)(predictions, references))
        elif m.startswith("rouge"):
            for kind, (total, values) in rouge(predictions, references, (m,)).items():
                put(kind, total, values)
        else:
            raise LmforgeError(f"unknown metric {m!r}; choose from {', '.join(TEXT_METRICS)}")
    return task, per
