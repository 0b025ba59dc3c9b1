"""Words as tagging corpora have them, and the text a run of words makes.

Tagging corpora label words: runs of letters and digits, each other symbol on its own, and
each Chinese or Japanese character on its own (those corpora label characters). Written text
puts a space between words, except where Chinese or Japanese is involved: those scripts run
on without spaces, so a character word joins its neighbours directly. Training and prediction
both build the model's input from `word_texts`, so a tagger sees the same tokens either way,
and for Chinese those are the tokens of the text as people write it.
"""

from __future__ import annotations

import re

# Han ideographs (with extensions A and the compatibility block), kana and CJK punctuation.
_CHARACTER_WORDS = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CHARACTER = re.compile(rf"[{_CHARACTER_WORDS}]")
_WORD = re.compile(rf"[{_CHARACTER_WORDS}]|(?:(?![{_CHARACTER_WORDS}])\w)+|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) in `text`, as tagging corpora split words."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _is_character(word: str) -> bool:
    return len(word) == 1 and _CHARACTER.match(word) is not None


def word_texts(words: list[str]) -> list[str]:
    """Each word with what goes before it in running text: nothing for the first word and next to a
    Chinese or Japanese character, a space otherwise."""
    out = []
    for i, word in enumerate(words):
        spaced = i > 0 and not _is_character(word) and not _is_character(words[i - 1])
        out.append(" " + word if spaced else word)
    return out


def join_words(words: list[str]) -> tuple[str, list[tuple[str, int, int]]]:
    """The text of `words` and each word's (word, start, end) in it."""
    text, spans = "", []
    for word, piece in zip(words, word_texts(words)):
        start = len(text) + len(piece) - len(word)
        text += piece
        spans.append((word, start, start + len(word)))
    return text, spans
