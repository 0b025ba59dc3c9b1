"""Relation triples: reading them out of a model's text, comparing them, scoring them.

A triple is (head, relation, tail), written as JSON `{"head": ..., "relation": ..., "tail": ...}`;
an extraction is a JSON array of them. A model's output is read leniently: the first JSON
array in the text (after any preamble, inside a code fence, followed by anything), whose
items are triple objects or three-item lists; other items are skipped.

Triples are compared after normalisation: Unicode NFKC (full-width letters and digits become
ASCII, `ＡＰＩ` is `API`), case folded, whitespace collapsed, punctuation at either end dropped;
a relation also has its spaces and hyphens turned into underscores (`works at`, `works-at`
and `works_at` are one relation). Chinese text is kept as it is: no segmentation, no
conversion between simplified and traditional. An example's triples are a set, so a triple
written twice counts once, and only a whole triple matches (a right head and relation with
the wrong tail is a miss). Precision, recall and F1 are micro-averaged over the task's
triples; per example, an empty prediction of an empty gold set scores 1.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

FIELDS = ("head", "relation", "tail")
METRICS = ("triple_f1",)  # reported as triple_precision, triple_recall, triple_f1 and parsed
MAX_TRIPLES = 8
MAX_CHARS = 48

# What constrained decoding allows: compact triples with short strings, so that an output
# ends within a small model's context.
SCHEMA: dict[str, Any] = {
    "type": "array", "maxItems": MAX_TRIPLES,
    "items": {"type": "object", "additionalProperties": False, "required": list(FIELDS),
              "properties": {f: {"type": "string", "minLength": 1, "maxLength": MAX_CHARS} for f in FIELDS}},
}

Triple = tuple[str, str, str]
_SPACE = re.compile(r"\s+")
_REL_SEP = re.compile(r"[\s\-]+")


def _strip_punct(text: str) -> str:
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[start:end]


def normalize(text: str) -> str:
    return _strip_punct(_SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()).strip()


def normalize_relation(text: str) -> str:
    return _REL_SEP.sub("_", normalize(text))


def as_triple(item: Any) -> Triple | None:
    """A triple from an object with head/relation/tail or a list of three, as written (not
    normalised); None for anything else or an empty part."""
    if isinstance(item, dict):
        values = [item.get(f) for f in FIELDS]
    elif isinstance(item, (list, tuple)) and len(item) == 3:
        values = list(item)
    else:
        return None
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        return None
    head, relation, tail = (str(v).strip() for v in values)
    return (head, relation, tail) if head and relation and tail else None


def parse_triples(text: str) -> list[Triple] | None:
    """The triples of the first JSON array in `text`; None when it holds no JSON array."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return [t for t in map(as_triple, value) if t is not None]
    return None


def key(triple: Triple) -> Triple:
    head, relation, tail = triple
    return normalize(head), normalize_relation(relation), normalize(tail)


def compare(predicted: list[Triple], gold: list[Triple]) -> tuple[int, int, int]:
    """(true positives, predicted, gold), each a count of distinct normalised triples."""
    ours, theirs = {key(t) for t in predicted}, {key(t) for t in gold}
    return len(ours & theirs), len(ours), len(theirs)


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; nothing predicted of nothing is perfect."""
    if n_pred == 0 and n_gold == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def score(predicted: list[list[Triple] | None],
          gold: list[list[Triple]]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(task scores: micro precision/recall/F1 and the fraction of outputs that parsed,
    per-example scores). An output that did not parse predicts no triples."""
    totals = [0, 0, 0]
    per = []
    for pred, ref in zip(predicted, gold):
        counts = compare(pred or [], ref)
        totals = [a + b for a, b in zip(totals, counts)]
        p, r, f = prf(*counts)
        per.append({"triple_precision": p, "triple_recall": r, "triple_f1": f, "parsed": float(pred is not None)})
    p, r, f = prf(*totals)
    parsed = sum(x is not None for x in predicted) / max(len(predicted), 1)
    return {"triple_precision": p, "triple_recall": r, "triple_f1": f, "parsed": parsed}, per


def dumps(triples: list[Triple]) -> str:
    """Compact JSON text of triples, as a model is trained to write them."""
    return json.dumps([dict(zip(FIELDS, t)) for t in triples], ensure_ascii=False, separators=(",", ":"))
