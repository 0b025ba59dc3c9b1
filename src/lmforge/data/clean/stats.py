"""Counting what every step did: documents and characters in and out, reasons, samples.

A `StepStats` exists for each step in pipeline order (normalize, langid, each filter, pii,
decontaminate, exact_dedup, near_dedup). Every document read is either written out or
counted as removed by exactly one step, so `docs_read == docs_out + sum(removed)` holds
and is checked when the report is written. A step that edits documents also counts the
lines it took out of the documents it kept, per reason, with a few samples. Shard stats
are plain dicts (JSON) and merge by addition, so a worker's result can be written to disk
and summed later.
"""

from __future__ import annotations

import math
from collections import Counter

SAMPLE_CHARS = 1000
SAMPLE_LINE_CHARS = 200
LENGTH_BINS = 32  # log10(characters) from 0 to 8 in quarter decades
SCORE_BINS = 20


def length_bin(chars: int) -> int:
    return min(LENGTH_BINS - 1, int(math.log10(chars + 1) * 4))


def score_bin(score: float) -> int:
    return min(SCORE_BINS - 1, int(score * SCORE_BINS))


def _new_step() -> dict:
    return {"docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0, "docs_removed": 0, "chars_removed": 0,
            "reasons": Counter(), "samples": [], "lines_removed": Counter(), "line_samples": []}


class ShardStats:
    def __init__(self, steps: list[str], samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.steps = {step: _new_step() for step in steps}
        self.reader_issues: Counter = Counter()
        self.pii: Counter = Counter()
        self.languages: Counter = Counter()
        self.hist = {"chars_read": [0] * LENGTH_BINS, "chars_out": [0] * LENGTH_BINS, "lang_score": [0] * SCORE_BINS}
        self.docs_read = self.chars_read = 0

    def read(self, chars: int) -> None:
        self.docs_read += 1
        self.chars_read += chars
        self.hist["chars_read"][length_bin(chars)] += 1

    def passed(self, step: str, chars_in: int, chars_out: int) -> None:
        s = self.steps[step]
        s["docs_in"] += 1
        s["docs_out"] += 1
        s["chars_in"] += chars_in
        s["chars_out"] += chars_out

    def removed(self, step: str, reason: str, doc_id: str, text: str, chars_in: int,
                language: str | None = None, language_score: float | None = None) -> None:
        s = self.steps[step]
        s["docs_in"] += 1
        s["chars_in"] += chars_in
        s["docs_removed"] += 1
        s["chars_removed"] += len(text)
        s["reasons"][reason] += 1
        if len(s["samples"]) < self.samples_per_step:
            sample = {"id": doc_id, "reason": reason, "text": text[:SAMPLE_CHARS]}
            if language is not None:  # why a document was judged as it was often starts with its language
                sample["lang"], sample["lang_score"] = language, round(language_score, 4)
            s["samples"].append(sample)

    def lines_removed(self, step: str, doc_id: str, lines: list[tuple[str, str]]) -> None:
        """Lines (reason, text) that `step` took out of a document it kept."""
        s = self.steps[step]
        for reason, line in lines:
            s["lines_removed"][reason] += 1
            if len(s["line_samples"]) < self.samples_per_step:
                s["line_samples"].append({"id": doc_id, "reason": reason, "line": line[:SAMPLE_LINE_CHARS]})

    def to_dict(self) -> dict:
        return {
            "docs_read": self.docs_read,
            "chars_read": self.chars_read,
            "reader_issues": dict(self.reader_issues),
            "steps": {name: {**s, "reasons": dict(s["reasons"]), "lines_removed": dict(s["lines_removed"])}
                      for name, s in self.steps.items()},
            "pii": dict(self.pii),
            "languages": dict(self.languages),
            "histograms": self.hist,
        }


def merge(stats: list[dict], samples_per_step: int) -> dict:
    """Sum shard stats (in shard order, so the kept samples are deterministic)."""
    total: dict = {"docs_read": 0, "chars_read": 0, "reader_issues": Counter(), "steps": {}, "pii": Counter(),
                   "languages": Counter(), "histograms": {}}
    for shard in stats:
        total["docs_read"] += shard["docs_read"]
        total["chars_read"] += shard["chars_read"]
        for key in ("reader_issues", "pii", "languages"):
            total[key].update(shard[key])
        for name, hist in shard["histograms"].items():
            acc = total["histograms"].setdefault(name, [0] * len(hist))
            total["histograms"][name] = [a + b for a, b in zip(acc, hist)]
        for name, step in shard["steps"].items():
            acc = total["steps"].setdefault(name, _new_step())
            for key in ("docs_in", "chars_in", "docs_out", "chars_out", "docs_removed", "chars_removed"):
                acc[key] += step[key]
            for key in ("reasons", "lines_removed"):
                acc[key].update(step.get(key, {}))
            for key in ("samples", "line_samples"):
                acc[key].extend(step.get(key, [])[: max(0, samples_per_step - len(acc[key]))])
    for key in ("reader_issues", "pii", "languages"):
        total[key] = dict(sorted(total[key].items()))
    for step in total["steps"].values():
        step["reasons"] = dict(step["reasons"])
        step["lines_removed"] = dict(step["lines_removed"])
    return total
