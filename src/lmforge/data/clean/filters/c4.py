"""C4 line rules (Raffel et al. 2020; defaults as datatrove's C4QualityFilter, as FineWeb ran it).

Edits the document: lines that fail a line rule are removed; the document is dropped
when a document rule fires or too few sentences remain. `filter_no_terminal_punct`
defaults to off, as in FineWeb, because it deletes headings, lists and code lines.

Sentences end at 。！？ as well as . ! ?, and a line's words are `segment.words` (Chinese and
Japanese segmented). C4's document rules were made for English pages, and FineWeb-2 does not
apply them to other languages: for Chinese and Japanese the five-sentence minimum, the
curly-bracket rule and the three-words-a-line rule (which takes headings such as "五、总结")
are off; Gopher's word-count minimum still removes fragments, the boilerplate filter menus.
"""

from __future__ import annotations

import re

from typing import Any

from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import Filter, FilterParams
from lmforge.data.clean.segment import words
from lmforge.data.clean.text import SENTENCE_END_RE

_CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_C4_END = (".", "?", "!", '"', "'", "。", "？", "！", "”", "」")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_NOT_ENGLISH_PAGES = {"min_num_sentences": None, "filter_curly_bracket": False, "min_words_per_line": None}
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Params(FilterParams):
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False
    min_num_sentences: int | None = 5
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    by_language: dict[str, dict[str, Any]] = {"zh": _NOT_ENGLISH_PAGES, "ja": _NOT_ENGLISH_PAGES}


class C4Filter(Filter):
    name = "c4"
    Params = C4Params

    @staticmethod
    def _line_rule(line: str, p: C4Params, language: str | None) -> str | None:
        """The reason a line goes, or None."""
        if p.filter_no_terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
            return "no_terminal_punct"
        line_words = words(line, language)
        if p.min_words_per_line is not None and len(line_words) < p.min_words_per_line:
            return "few_words"
        too_long = p.max_word_length is not None and len(line) > p.max_word_length  # else no word can be
        if too_long and line_words and max(map(len, line_words)) > p.max_word_length:
            return "long_word"
        low = line.lower()
        if p.filter_javascript and "javascript" in low:
            return "javascript"
        if p.filter_policy and any(phrase in low for phrase in _POLICY):
            return "policy"
        return None

    def apply(self, doc: Document) -> str | None:
        p = self.params_for(doc)
        lowered = doc.text.lower()
        if p.filter_lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if p.filter_curly_bracket and "{" in doc.text:
            return "curly_bracket"
        kept = []
        for line in doc.text.split("\n"):
            line = line.strip()
            if not line:
                kept.append(line)  # paragraph breaks stay
                continue
            if p.remove_citations:
                line = _CITATION_RE.sub("", line)
            reason = self._line_rule(line, p, doc.language)
            if reason is not None:
                doc.removed_lines.append((reason, line))
                continue
            kept.append(line)
        text = _BLANK_LINES_RE.sub("\n\n", "\n".join(kept)).strip()
        if not text:
            return "no_lines_left"
        if p.min_num_sentences is not None and len(SENTENCE_END_RE.findall(text)) < p.min_num_sentences:
            return "min_num_sentences"
        doc.text = text
        return None
