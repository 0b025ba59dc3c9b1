"""Language identification with py3langid (its naive-Bayes model ships inside the wheel).

Each document gets an ISO 639-1 code and a normalized probability. Only the first
`max_chars` characters are classified (1000 by default): enough for a stable answer, and
the cost stays bounded for long documents (py3langid is pure Python, ~1 MB/s).
"""

from __future__ import annotations

from functools import lru_cache

from lmforge.data.clean.document import Document


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 1000) -> tuple[str, float]:
    language, score = _identifier().classify(text[:max_chars])
    return language, float(score)


def label(doc: Document, max_chars: int = 1000) -> None:
    doc.language, doc.language_score = identify(doc.text, max_chars)


def keep(doc: Document, languages: list[str] | None, min_score: float) -> str | None:
    """None to keep, or the reason the document is dropped."""
    if languages is None:
        return None
    if doc.language not in languages:
        return "other_language"
    if doc.language_score < min_score:
        return "low_score"
    return None
