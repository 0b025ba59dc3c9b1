"""Arithmetic word problems in English and Chinese, generated with checked answers: the data
of the built-in GRPO recipe (`lmforge finetune grpo-arithmetic`) and of benchmarks/grpo.py.

    Q: Tom has 8 apples and gets 7 more. How many apples does Tom have now?
    A: 8 + 7 = 15. The answer is 15.

    问：小明有8个苹果，又买了7个。现在有几个苹果？
    答：8 + 7 = 15。答案是15。

Problems are short, so that the quickstart model (context 128) holds a Chinese one with its
worked answer. Each answer is computed twice, from the operands and by evaluating the written
equation, and a problem whose two disagree is a bug that raises. `problems(n, seed)` draws
distinct problems; `exclude` keeps a held-out set apart from a training one. `equation_reward`
rewards writing the problem's equation, a denser signal than the answer for a weak model.
"""

from __future__ import annotations

import ast
import operator
import random
from dataclasses import dataclass
from pathlib import Path

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

_EN = {
    "+": "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
    "-": "{name} has {a} {item}s and gives away {b}. How many {item}s are left?",
    "*": "{name} buys {a} bags with {b} {item}s in each. How many {item}s in all?",
}
_ZH = {
    "+": "{name}有{a}个{item}，又买了{b}个。现在有几个{item}？",
    "-": "{name}有{a}个{item}，送出了{b}个。还剩几个{item}？",
    "*": "{name}买了{a}袋{item}，每袋{b}个。一共有几个{item}？",
}
_NAMES = {"en": ["Tom", "Ann", "Ben", "Lily", "Sam", "Mia"], "zh": ["小明", "小红", "小华", "小丽", "小军", "小芳"]}
_ITEMS = {"en": ["apple", "pen", "book", "egg", "card", "cup"], "zh": ["苹果", "铅笔", "书", "鸡蛋", "卡片", "杯子"]}
PROMPT = {"en": "Q: {question}\nA:", "zh": "问：{question}\n答："}


@dataclass(frozen=True)
class Problem:
    lang: str  # en or zh
    question: str
    equation: str  # "12 + 7"
    answer: int

    @property
    def prompt(self) -> str:
        return PROMPT[self.lang].format(question=self.question)

    @property
    def solution(self) -> str:
        """The worked answer that SFT teaches: the equation, then the answer."""
        if self.lang == "zh":
            return f"{self.equation} = {self.answer}。答案是{self.answer}。"
        return f" {self.equation} = {self.answer}. The answer is {self.answer}."


def evaluate_equation(equation: str) -> int:
    """The value of `a op b` (+, -, *), by parsing it: the check on every generated answer."""
    node = ast.parse(equation, mode="eval").body
    if not (isinstance(node, ast.BinOp) and type(node.op) in _OPS
            and all(isinstance(x, ast.Constant) and isinstance(x.value, int) for x in (node.left, node.right))):
        raise ValueError(f"not a two-number equation: {equation!r}")
    return _OPS[type(node.op)](node.left.value, node.right.value)


def _operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    """Single-digit operands (a - b >= 1): within reach of the quickstart-sized model."""
    if op == "+":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return a, b, a + b
    if op == "-":
        a = rng.randint(2, 18)
        b = rng.randint(max(1, a - 9), min(9, a - 1))
        return a, b, a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, a * b


def problem(rng: random.Random, lang: str | None = None) -> Problem:
    lang = lang or rng.choice(["en", "zh"])
    op = rng.choice("+-*")
    a, b, answer = _operands(op, rng)
    name, item = rng.choice(_NAMES[lang]), rng.choice(_ITEMS[lang])
    question = (_ZH if lang == "zh" else _EN)[op].format(name=name, item=item, a=a, b=b)
    equation = f"{a} {op} {b}"
    if evaluate_equation(equation) != answer:
        raise AssertionError(f"generated answer {answer} disagrees with {equation}")
    return Problem(lang, question, equation, answer)


def problems(n: int, seed: int, exclude: set[str] = frozenset(), lang: str | None = None) -> list[Problem]:
    """`n` distinct problems (no question twice, none in `exclude`), English and Chinese mixed
    unless `lang` says one."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = problem(rng, lang)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def sft_row(p: Problem) -> dict:
    return {"prompt": p.prompt, "completion": p.solution}


def grpo_row(p: Problem, index: int) -> dict:
    return {"prompt": p.prompt, "answer": p.answer, "equation": p.equation, "id": f"arith-{p.lang}-{index}",
            "lang": p.lang}


def equation_reward(prompt, completion: str, equation: str = "", **_) -> float:
    """1 when the completion writes the problem's equation ("4 * 7"): a denser reward than the
    answer's alone (a grpo reward, `lmforge.data.arithmetic:equation_reward`), for a model
    that does not yet set up the problem."""
    return float(bool(equation) and " ".join(equation.split()) in " ".join(completion.split()))


# The built-in recipe's files (recipes/finetune/data): SFT warm start, GRPO prompts, held out.
SFT_SEED, GRPO_SEED, HELD_OUT_SEED = 1, 2, 3
SFT_SIZE, GRPO_SIZE, HELD_OUT_SIZE = 3000, 1000, 200


def recipe_files() -> dict[str, list[dict]]:
    """What recipes/finetune/data/arithmetic-*.jsonl hold: the held-out problems are disjoint
    from the SFT and GRPO ones."""
    held = problems(HELD_OUT_SIZE, HELD_OUT_SEED)
    apart = {p.question for p in held}
    sft = problems(SFT_SIZE, SFT_SEED, apart)
    grpo = problems(GRPO_SIZE, GRPO_SEED, apart)
    return {"arithmetic-sft.jsonl": [sft_row(p) for p in sft],
            "arithmetic-grpo.jsonl": [grpo_row(p, i) for i, p in enumerate(grpo)],
            "arithmetic-heldout.jsonl": [grpo_row(p, i) for i, p in enumerate(held)]}


def write_recipe_files(folder: Path) -> list[Path]:
    import json

    out = []
    for name, rows in recipe_files().items():
        path = folder / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        out.append(path)
    return out
