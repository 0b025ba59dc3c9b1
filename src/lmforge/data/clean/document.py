"""One document flowing through the refinery, with its per-text caches."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.data.clean import segment
from lmforge.data.clean import text as textlib


@dataclass(slots=True)
class Document:
    text: str
    id: str  # the input record's own id, else "<file>@<byte offset>" / "<file>#<row>" / "<file>"
    language: str | None = None
    language_score: float | None = None
    meta: dict = field(default_factory=dict)
    record: dict | None = None  # the whole input record (JSONL/Parquet), written out with the cleaned text
    removed_lines: list[tuple[str, str]] = field(default_factory=list)  # (reason, line) a filter took out
    _words: list[str] | None = None
    _words_of: str | None = None

    def words(self) -> list[str]:
        """Words of the current text, segmented for Chinese/Japanese (recomputed only when the text changed)."""
        if self._words_of is not self.text:
            self._words = segment.words(self.text, self.language)
            self._words_of = self.text
        return self._words

    @property
    def cjk(self) -> bool:
        return textlib.is_cjk(self.language, self.text)
