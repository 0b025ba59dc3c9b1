"""Gopher quality and repetition rules (Rae et al. 2021, appendix A; defaults as datatrove).

The defaults are the English thresholds. Words are `Document.words()`: Chinese and Japanese
are segmented (jieba, Sudachi), and for them `by_language` holds FineWeb-2's thresholds,
which FineWeb-2 derived from each language's own distribution of the same statistics on
the same segmenters' words: word-length bounds, the share of words with a letter, stop
words, duplicated lines and the repeated n-gram limits.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import Filter, FilterParams
from lmforge.data.clean.text import STOP_WORDS

# FineWeb-2's configs for cmn_Hani and jpn_Jpan (the stop words are in `text.STOP_WORDS`).
_ZH_QUALITY = {"min_avg_word_length": 1, "max_avg_word_length": 5, "max_non_alpha_words_ratio": 0.735}
_JA_QUALITY = {"min_avg_word_length": 1, "max_avg_word_length": 5, "max_non_alpha_words_ratio": 0.759}
_ZH_REPETITION = {"dup_line_frac": 0.287, "top_n_grams": [(2, 0.256), (3, 0.201), (4, 0.171)],
                  "dup_n_grams": [(5, 0.198), (6, 0.182), (7, 0.167), (8, 0.154), (9, 0.14), (10, 0.127)]}
_JA_REPETITION = {"dup_line_frac": 0.375, "top_n_grams": [(2, 0.121), (3, 0.129), (4, 0.145)],
                  "dup_n_grams": [(5, 0.307), (6, 0.283), (7, 0.264), (8, 0.248), (9, 0.234), (10, 0.223)]}
_LETTER_RE = re.compile(r"[^\W\d_]")
_BULLETS = ("•", "●", "○", "■", "□", "▪", "-", "*", "·", "‣", "⁃", "◦")


class GopherQualityParams(FilterParams):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] | None = None  # None: the built-in list of the document's language
    by_language: dict[str, dict[str, Any]] = {"zh": _ZH_QUALITY, "ja": _JA_QUALITY}


class GopherQualityFilter(Filter):
    name = "gopher_quality"
    Params = GopherQualityParams

    def apply(self, doc: Document) -> str | None:
        p = self.params_for(doc)
        text = doc.text
        words = doc.words()
        n_words = len(words)
        if p.min_doc_words is not None and n_words < p.min_doc_words:
            return "min_doc_words"
        if p.max_doc_words is not None and n_words > p.max_doc_words:
            return "max_doc_words"
        if n_words == 0:
            return "min_doc_words"
        mean_length = sum(map(len, words)) / n_words
        if p.min_avg_word_length is not None and mean_length < p.min_avg_word_length:
            return "min_avg_word_length"
        if p.max_avg_word_length is not None and mean_length > p.max_avg_word_length:
            return "max_avg_word_length"
        if p.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            if symbols / n_words > p.max_symbol_word_ratio:
                return "max_symbol_word_ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines and p.max_bullet_lines_ratio is not None:
            if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > p.max_bullet_lines_ratio:
                return "max_bullet_lines_ratio"
        if lines and p.max_ellipsis_lines_ratio is not None:
            ellipsis = sum(line.endswith(("...", "…")) for line in lines)
            if ellipsis / len(lines) > p.max_ellipsis_lines_ratio:
                return "max_ellipsis_lines_ratio"
        if p.max_non_alpha_words_ratio is not None:
            alpha = sum(1 for word in words if _LETTER_RE.search(word))
            if alpha / n_words < p.max_non_alpha_words_ratio:
                return "max_non_alpha_words_ratio"
        if p.min_stop_words is not None:
            stop_words = set(p.stop_words) if p.stop_words is not None else STOP_WORDS.get(doc.language or "")
            if stop_words is not None:  # no list for this language: the rule cannot judge it
                found = sum(map(stop_words.__contains__, map(str.lower, words)))
                if found < p.min_stop_words:
                    return "min_stop_words"
        return None


class GopherRepetitionParams(FilterParams):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    by_language: dict[str, dict[str, Any]] = {"zh": _ZH_REPETITION, "ja": _JA_REPETITION}


def duplicated(items: list[str]) -> tuple[int, int]:
    """(number of items seen before in the list, characters in those repeated items)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngram_hashes(word_ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-gram of word ids (uint64 wraps around by design)."""
    m = len(word_ids)
    grams = np.zeros(m - n + 1, dtype=np.uint64)
    for k in range(n):
        grams = grams * np.uint64(1_000_003) + word_ids[k : m - n + 1 + k]
    return grams


def top_ngram_char_fraction(word_ids: np.ndarray, word_lengths: np.ndarray, n: int) -> float:
    """Characters in the most frequent n-gram, times its count, over all word characters."""
    m = len(word_ids)
    if m < n:
        return 0.0
    grams = _ngram_hashes(word_ids, n)
    _, first, counts = np.unique(grams, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = first[top]
    return float(counts[top] * word_lengths[start : start + n].sum() / word_lengths.sum())


def duplicated_ngram_char_fraction(word_ids: np.ndarray, word_lengths: np.ndarray, n: int) -> float:
    """Fraction of word characters covered by repeated occurrences of any n-gram.

    An n-gram occurrence is "repeated" when the same n-gram occurred earlier; each covered
    character counts once however many repeated n-grams overlap it.
    """
    m = len(word_ids)
    if m < n:
        return 0.0
    gram_hash = _ngram_hashes(word_ids, n)
    _, first = np.unique(gram_hash, return_index=True)
    repeated = np.ones(len(gram_hash), dtype=bool)
    repeated[first] = False
    starts = np.flatnonzero(repeated)
    if len(starts) == 0:
        return 0.0
    coverage = np.zeros(m + 1, dtype=np.int32)
    np.add.at(coverage, starts, 1)
    np.add.at(coverage, starts + n, -1)
    covered = np.cumsum(coverage[:m]) > 0
    return float(word_lengths[covered].sum() / word_lengths.sum())


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"
    Params = GopherRepetitionParams

    def apply(self, doc: Document) -> str | None:
        p = self.params_for(doc)
        text = doc.text
        total = len(text)
        if total == 0:
            return "empty"
        paragraphs = [x for x in re.split(r"\n{2,}", text.strip()) if x.strip()]
        n_dup, dup_chars = duplicated(paragraphs)
        if paragraphs and p.dup_para_frac is not None and n_dup / len(paragraphs) > p.dup_para_frac:
            return "dup_para_frac"
        if p.dup_para_char_frac is not None and dup_chars / total > p.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = [x for x in text.split("\n") if x.strip()]
        n_dup, dup_chars = duplicated(lines)
        if lines and p.dup_line_frac is not None and n_dup / len(lines) > p.dup_line_frac:
            return "dup_line_frac"
        if p.dup_line_char_frac is not None and dup_chars / total > p.dup_line_char_frac:
            return "dup_line_char_frac"
        words = doc.words()
        if not words:
            return None
        vocabulary = {w: i for i, w in enumerate(dict.fromkeys(words))}
        ids = np.fromiter(map(vocabulary.__getitem__, words), np.uint64, len(words))
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        for n, limit in p.top_n_grams:
            if top_ngram_char_fraction(ids, lengths, n) > limit:
                return f"top_{n}_gram"
        ordered = sorted(p.dup_n_grams)
        for k, (n, limit) in enumerate(ordered):
            fraction = duplicated_ngram_char_fraction(ids, lengths, n)
            if fraction > limit:
                return f"dup_{n}_gram"
            # what repeated (n+1)-grams cover, repeated n-grams cover too: the fraction only
            # falls with n, so once it is under every later limit no later rule can fire
            if all(fraction <= later for _, later in ordered[k + 1 :]):
                break
        return None
