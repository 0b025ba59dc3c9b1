"""FineWeb's own rules (Penedo et al. 2024; defaults as datatrove's FineWebQualityFilter).

Lines ending in punctuation, short lines, characters in duplicated lines, and newlines per
word. The defaults are FineWeb's English ones. Chinese and Japanese take FineWeb-2's: the
punctuated-line and newline-per-word thresholds derived from each language's distribution,
the short-line rule off and duplicated-line characters up to 10% (FineWeb-2's settings for
every language other than English).
"""

from __future__ import annotations

from typing import Any

from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import Filter, FilterParams
from lmforge.data.clean.filters.gopher import duplicated
from lmforge.data.clean.text import TERMINAL_PUNCTUATION, non_empty_lines

_FINEWEB2 = {"short_line_thr": None, "char_duplicates_ratio": 0.1}
_ZH = {**_FINEWEB2, "line_punct_thr": 0.106, "new_line_ratio": 0.178}
_JA = {**_FINEWEB2, "line_punct_thr": 0.167, "new_line_ratio": 0.162}


class FineWebParams(FilterParams):
    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float | None = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3
    by_language: dict[str, dict[str, Any]] = {"zh": _ZH, "ja": _JA}


class FineWebFilter(Filter):
    name = "fineweb"
    Params = FineWebParams

    def apply(self, doc: Document) -> str | None:
        p = self.params_for(doc)
        lines = [line.rstrip() for line in non_empty_lines(doc.text)]
        if not lines:
            return "empty"
        if p.line_punct_thr is not None:
            ratio = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
            if ratio < p.line_punct_thr and not (ratio == 0 and p.line_punct_exclude_zero):
                return "line_punct_ratio"
        if p.short_line_thr is not None:
            ratio = sum(len(line) <= p.short_line_length for line in lines) / len(lines)
            if ratio > p.short_line_thr:
                return "short_line_ratio"
        if p.char_duplicates_ratio is not None:
            if duplicated(lines)[1] / len(doc.text) > p.char_duplicates_ratio:
                return "char_dup_ratio"
        if p.new_line_ratio is not None:
            n_words = len(doc.words())
            if n_words == 0 or doc.text.count("\n") / n_words > p.new_line_ratio:
                return "list_ratio"
        return None
