"""Text units shared by the filters and deduplication, CJK-aware.

Chinese and Japanese have no spaces between words, so a "word" here is either a run of
letters/digits in a space-delimited script or ONE Han/Kana/Hangul-syllable character. With
that single tokenizer the word-based rules (counts, stop words, n-grams) work on mixed
text without a segmenter, and character n-grams fall out for CJK shingles.
"""

from __future__ import annotations

import re

_CJK_RANGES = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0002ffff"  # Extensions B-F
)
_CJK_CHAR = f"[{_CJK_RANGES}]"
# One CJK character, or a run of other word characters (apostrophes and hyphens inside).
JOINERS = "'’-"  # join two runs of word characters into one word: don't, well-known
_NON_CJK_WORD_CHAR = f"[^\\W{_CJK_RANGES}]"  # \w minus the CJK ranges
WORD_RE = re.compile(rf"{_CJK_CHAR}|{_NON_CJK_WORD_CHAR}+(?:[{JOINERS}]{_NON_CJK_WORD_CHAR}+)*")
_PLAIN_WORD_RE = re.compile(rf"\w+(?:[{JOINERS}]\w+)*")  # the same tokens for text without CJK, faster
CJK_RE = re.compile(_CJK_CHAR)
CJK_LANGUAGES = frozenset({"zh", "ja"})

# Sentence-ending punctuation, Latin and CJK (full-width forms survive NFC but not NFKC).
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』", "：", ":", ";", "；")
# A sentence ends at 。！？ (Chinese and Japanese need no space after them), or at . ! ? followed
# by a space, a closing quote or bracket, or the end: "3.5", "Node.js" and "www.example.org"
# end nothing.
SENTENCE_END_RE = re.compile(r"[。！？]+[」』”’]?|[.!?]+(?=[\s\"'”’)\]」』]|$)")

# Stop words used by the Gopher "at least N stop words" rule, per language.
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"}),
    # zh, ja: FineWeb-2's lists (the most frequent jieba / Sudachi words, simplified and traditional)
    "zh": frozenset("的 年 在 月 是 和 日 了 於 為 有 被 人 中 为 他 與 後 也 而 由".split()),
    "ja": frozenset("の に を は た て が と で 年 し 月 れ さ".split()),
    "de": frozenset({"der", "die", "und", "das", "ist", "zu", "den", "mit"}),
    "fr": frozenset({"le", "la", "de", "et", "les", "des", "est", "un"}),
    "es": frozenset({"el", "la", "de", "que", "y", "en", "los", "se"}),
}


def words(text: str) -> list[str]:
    """Word tokens: runs of word characters, or single CJK characters."""
    if CJK_RE.search(text) is None:
        return _PLAIN_WORD_RE.findall(text)
    return WORD_RE.findall(text)


def cjk_ratio(text: str, sample: int = 4000) -> float:
    """Fraction of the non-space characters (of the first `sample`) that are CJK."""
    head = text[:sample]
    non_space = sum(1 for ch in head if not ch.isspace())
    return len(CJK_RE.findall(head)) / non_space if non_space else 0.0


def is_cjk(language: str | None, text: str) -> bool:
    if language is not None:
        return language in CJK_LANGUAGES
    return cjk_ratio(text) > 0.3


def non_empty_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]
