"""What a trained task head says about texts, as JSON-ready records: a classification's label and
probabilities, a tagging's words, tags and entities with character offsets into the text.
`lmforge classify` / `lmforge tag` (train/predict.py) print these, and the server's /v1/classify
and /v1/tag send them.

Tagging labels words. A text is split into words the way tagging corpora are (data/words.py):
runs of letters and digits, each other symbol on its own, and each Chinese or Japanese character
on its own (those corpora label characters). An entity is a B- word and the I- words of its type
after it.
"""

from __future__ import annotations

from typing import Any

from lmforge.data.words import join_words, split_words
from lmforge.model.heads import bio_spans


def classification(labels: list[str], probabilities: list[float]) -> dict[str, Any]:
    """The most probable label, its probability, and every label's."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"label": labels[best], "probability": round(probabilities[best], 6),
            "probabilities": {label: round(p, 6) for label, p in zip(labels, probabilities)}}


def entities(words: list[tuple[str, int, int]], tags: list[str], text: str) -> list[dict[str, Any]]:
    """The BIO entities over `words` (word, start, end), with their text and character offsets."""
    spans = sorted(bio_spans(tags))
    return [{"text": text[words[a][1]:words[b - 1][2]], "type": kind, "start": words[a][1], "end": words[b - 1][2]}
            for a, b, kind in spans]


def tag_text(tuned, text: str | None, words: list[str] | None = None) -> dict[str, Any]:
    """A text tagged by `tuned` (a TaskModel with a tagging head): its words with their tags and
    offsets, and its entities. Pre-split `words` are joined (data/words.join_words) into the text
    the offsets point into. Words past the model's context get no tag: `untagged_words` counts them."""
    source, spans = join_words(words) if words is not None else (text or "", split_words(text or ""))
    tags = tuned.tag([[w for w, _, _ in spans]])[0] if spans else []
    out = {"text": source, "words": [{"word": w, "tag": t, "start": a, "end": b} for (w, a, b), t in zip(spans, tags)],
           "entities": entities(spans, tags, source)}
    if len(spans) > len(tags):
        out["untagged_words"] = len(spans) - len(tags)
    return out
