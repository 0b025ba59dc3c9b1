"""Perturbation probes: the same task on perturbed inputs, and how much its metric drops.

`lmforge eval --tasks T --perturb typos,fullwidth,paraphrase,case,punct` (or a task file's
`"perturb": [...]`) evaluates each task once clean and once per perturbation. Only the
evaluated example's context changes: few-shot examples, choices and references stay clean, and
each perturbed example draws the same few-shot examples as its clean original, so the drop is
the perturbation's alone. Random choices are seeded by (run seed, perturbation, example), so
every model sees the same perturbed inputs and a run repeats.

- `typos`: a Latin word of 3+ letters gets, with probability TYPO_RATE, one typo: a letter
  replaced by a neighbouring QWERTY key, two neighbouring letters swapped, or a letter dropped.
  A Han character gets, with probability TYPO_RATE, a similar-looking or same-sounding
  character from SIMILAR_HAN (its common confusions), or is dropped when it has none listed.
- `fullwidth`: half-width <-> full-width: ASCII letters, digits, punctuation and the space
  become their full-width forms (U+FF01..U+FF5E, U+3000), full-width forms become ASCII.
- `case`: each Latin word, with probability 1/2, written in capitals (or, if it already is,
  in lower case).
- `punct`: each punctuation mark (ASCII or CJK), with probability 1/2, dropped.
- `paraphrase`: the contexts the task file supplies: an example's `"paraphrases": [...]`,
  each evaluated as an example of its own. Nothing is paraphrased automatically; every
  example must bring its variants.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import replace
from typing import Any

from lmforge.errors import LmforgeError

PERTURBATIONS = ("typos", "fullwidth", "paraphrase", "case", "punct")
# Task types whose input is a free-text context to perturb (a code prompt would stop parsing;
# perplexity and minimal pairs have no clean-vs-perturbed question).
PERTURBABLE = ("multiple_choice", "generation", "extraction")
TYPO_RATE = 0.2
SEPARATOR = "+"  # a perturbed run's task name: TASK+typos

_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
QWERTY_NEIGHBOURS = {
    c: "".join(_ROWS[r + dr][i + di] for dr in (-1, 0, 1) for di in (-1, 0, 1)
               if (dr, di) != (0, 0) and 0 <= r + dr < 3 and 0 <= i + di < len(_ROWS[r + dr]))
    for r, row in enumerate(_ROWS) for i, c in enumerate(row)
}
# Characters commonly written for one another (shape or sound); each group maps both ways.
_SIMILAR_GROUPS = ["己已巳", "未末", "人入", "大太犬", "土士", "日曰", "在再", "的得地", "做作", "那哪", "他她它",
                   "以已", "象像", "须需", "即既", "候侯", "戊戌戍", "析折", "拔拨", "辩辨辫", "历厉", "坐座",
                   "练炼", "渡度", "园圆", "提题", "带戴", "克刻", "反返", "载栽", "买卖", "休体", "今令", "干千",
                   "王玉主", "天夭", "问间", "处外", "贝见", "话活", "请清情", "住往", "京景", "北比", "国围",
                   "名各", "年午", "生牛", "是事", "和合", "到倒", "要耍", "说兑", "时吋", "分份", "们门"]
SIMILAR_HAN = {c: "".join(dict.fromkeys(o for g in _SIMILAR_GROUPS if c in g for o in g if o != c))
               for c in dict.fromkeys("".join(_SIMILAR_GROUPS))}


def _rng(seed: int, name: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{name}:{index}")


def _is_han(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"


def _latin_typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    kind = rng.choice(("key", "swap", "drop"))
    if kind == "key" and word[i].lower() in QWERTY_NEIGHBOURS:
        near = rng.choice(QWERTY_NEIGHBOURS[word[i].lower()])
        return word[:i] + (near.upper() if word[i].isupper() else near) + word[i + 1:]
    if kind == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:]


def _words(text: str):
    """(start, end) of each run of ASCII letters."""
    start = None
    for i, c in enumerate(text + " "):
        latin = c.isascii() and c.isalpha()
        if latin and start is None:
            start = i
        elif not latin and start is not None:
            yield start, i
            start = None


def _rewrite_words(text: str, change) -> str:
    out, last = [], 0
    for s, e in _words(text):
        out += [text[last:s], change(text[s:e])]
        last = e
    return "".join(out) + text[last:]


def typos(text: str, rng: random.Random) -> str:
    text = _rewrite_words(text, lambda w: _latin_typo(w, rng) if len(w) >= 3 and rng.random() < TYPO_RATE else w)
    out = []
    for c in text:
        if _is_han(c) and rng.random() < TYPO_RATE:
            similar = SIMILAR_HAN.get(c)
            out.append(rng.choice(similar) if similar else "")
        else:
            out.append(c)
    return "".join(out)


def fullwidth(text: str, rng: random.Random | None = None) -> str:
    """Swap widths: ASCII -> full-width forms, full-width forms -> ASCII (newlines and tabs kept)."""
    out = []
    for c in text:
        o = ord(c)
        if 0x21 <= o <= 0x7E:
            out.append(chr(o + 0xFEE0))
        elif 0xFF01 <= o <= 0xFF5E:
            out.append(chr(o - 0xFEE0))
        else:
            out.append({" ": "\u3000", "\u3000": " "}.get(c, c))
    return "".join(out)


def case(text: str, rng: random.Random) -> str:
    return _rewrite_words(text, lambda w: (w.lower() if w.isupper() else w.upper()) if rng.random() < 0.5 else w)


def punct(text: str, rng: random.Random) -> str:
    return "".join(c for c in text if not (unicodedata.category(c).startswith("P") and rng.random() < 0.5))


PERTURB = {"typos": typos, "fullwidth": fullwidth, "case": case, "punct": punct}


def parse(spec: str | list[str] | None) -> list[str]:
    """`typos,fullwidth` or a list -> the names, checked, in order, without repeats."""
    if not spec:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for n in names:
        if n not in PERTURBATIONS:
            raise LmforgeError(f"unknown perturbation {n!r}; choose from {', '.join(PERTURBATIONS)} (comma-separated)")
    return list(dict.fromkeys(names))


def check(task, names: list[str]) -> None:
    """Refuse, before any model loads, a perturbation the task cannot take."""
    if names and task.type not in PERTURBABLE:
        raise LmforgeError(f"--perturb does not apply to {task.name} (a {task.type.replace('_', '-')} task); "
                           f"it perturbs the context of {', '.join(t.replace('_', '-') for t in PERTURBABLE)} tasks: "
                           "evaluate the others in a separate run")
    if "paraphrase" in names:
        for i, ex in enumerate(task.examples):
            variants = ex.get("paraphrases")
            if not (isinstance(variants, list) and variants and all(isinstance(v, str) and v for v in variants)):
                raise LmforgeError(f"task {task.name}, example {i + 1}: the paraphrase probe needs supplied variants: "
                                   'give every example "paraphrases": ["another wording of the context", ...]')


def perturb_task(task, name: str, seed: int):
    """The task with each example's context perturbed (`paraphrase`: one example per supplied
    variant); few-shot examples still come from the clean examples."""
    examples: list[dict[str, Any]] = []
    origin: list[int] = []
    for i, ex in enumerate(task.examples):
        if name == "paraphrase":
            variants = ex["paraphrases"]
        else:
            variants = [PERTURB[name](ex["context"], _rng(seed, name, i))]
        for v in variants:
            examples.append({**ex, "context": v})
            origin.append(i)
    return replace(task, name=f"{task.name}{SEPARATOR}{name}", examples=examples, shot_pool=task.examples,
                   origin=origin)


def drops(clean: dict[str, Any], perturbed: dict[str, Any], metrics: list[str]) -> dict[str, float]:
    """clean - perturbed per metric (every perturbable task's metrics are higher-is-better)."""
    return {f"{m}_drop": clean[m] - perturbed[m] for m in metrics}
