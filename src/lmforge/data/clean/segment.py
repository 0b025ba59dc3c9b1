"""Words for the quality filters: Chinese and Japanese segmented by a dictionary segmenter.

The filters' word rules (counts, mean length, stop words, repeated n-grams, newlines per
word) were designed on space-delimited words. Counting one Han character as a word makes a
5-gram two or three English words long, so the English thresholds misfire on Chinese.
Chinese is segmented with jieba (rjieba, the Rust port: a dictionary plus an HMM for
unknown words) and Japanese with Sudachi (SudachiPy with its core dictionary), the
segmenters FineWeb-2 used when it derived its per-language thresholds, so those thresholds
apply here as published. Other text keeps the regular-expression words of `text.words`.

A word is a token with at least one letter or digit: punctuation and spaces between
tokens are not words. Latin runs inside Chinese text (`PyTorch`, `self-attention`) come out
of the segmenter as one word each, as they would in English.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lmforge.data.clean.text import CJK_RE, words as regex_words

_KANA_RE = re.compile("[\u3040-\u30ff]")
_HAS_WORD_CHAR_RE = re.compile(r"\w")
# Sudachi refuses inputs over ~49 KB of UTF-8; a Japanese document is segmented in pieces
# cut at line ends, each well under that.
_SUDACHI_MAX_CHARS = 12_000


@lru_cache(maxsize=1)
def _sudachi():
    from sudachipy import Dictionary, SplitMode

    return Dictionary().tokenizer(mode=SplitMode.A)  # A: the shortest units, as FineWeb-2 segmented


def _chinese(text: str) -> list[str]:
    import rjieba

    return rjieba.cut(text)


def _japanese_pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + _SUDACHI_MAX_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _japanese(text: str) -> list[str]:
    tokenizer = _sudachi()
    return [m.surface() for piece in _japanese_pieces(text) for m in tokenizer.tokenize(piece)]


def segmenter_language(language: str | None, text: str) -> str | None:
    """"zh" or "ja" when the text needs a segmenter, None for space-delimited text."""
    if CJK_RE.search(text) is None:
        return None
    if language in ("zh", "ja"):
        return language
    return "ja" if _KANA_RE.search(text) else "zh"


def words(text: str, language: str | None = None) -> list[str]:
    """The text's words: segmented for Chinese/Japanese, regular-expression words otherwise."""
    which = segmenter_language(language, text)
    if which is None:
        return regex_words(text)
    tokens = _japanese(text) if which == "ja" else _chinese(text)
    return [t for t in tokens if _HAS_WORD_CHAR_RE.search(t)]
