"""Benchmark task files: their format, their config line, and the prompts built from them.

One example per line; the fields decide the task type (all examples of a file must agree):

    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}   multiple choice
    {"context": "2 + 2 =", "answer": "4"}                  generation (answer: a string or a list)
    {"prompt": "def f(x):\n", "test": "def check(f): ...", "entry_point": "f"}   code (HumanEval's fields)
    {"context": "Ada works at Acme.\nTriples:", "triples": [{"head": "Ada", "relation": "works_at", "tail": "Acme"}]}
                                                            extraction (eval/extraction.py)
    {"text": "Any document ..."}                            perplexity and bits per byte
    {"category": "age", "stereotyped": "...", "anti_stereotyped": "..."}   minimal pairs (eval/probes.py)

An optional first line `{"config": {...}}` sets the file's settings (`TaskConfig`): metrics,
stop strings, max tokens, samples, temperature, chat template, delimiter, pass@k's k,
constrained decoding (extraction), perturbation probes (eval/perturb.py).

Multiple choice scores each choice by log P(delimiter + choice | context): `acc` takes the
highest log-likelihood, `acc_norm` the highest log-likelihood per UTF-8 byte of the choice.
The delimiter is one space (lm-eval's target delimiter) unless the context ends in a space
or a CJK character (Chinese and Japanese put no space before an answer), or the file's
config sets one. Generation and code tasks decode (generation.py) and score with
metrics.py. Few-shot prompts put `num_fewshot` other solved examples of the same file
(drawn with a fixed seed) before the context, separated by blank lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.data.jsonl import json_objects
from lmforge.errors import LmforgeError
from lmforge.eval import triples
from lmforge.eval import perturb
from lmforge.eval.metrics import CODE_METRICS, TEXT_METRICS, is_cjk

SHOT_SEPARATOR = "\n\n"
TYPES = {"code": ("prompt", "test", "entry_point"), "multiple_choice": ("context", "choices", "gold"),
         "extraction": ("context", "triples"), "generation": ("context", "answer"), "perplexity": ("text",),
         "minimal_pairs": ("stereotyped", "anti_stereotyped", "category")}
# The field that tells the type, checked in this order.
MARKER = {"code": "entry_point", "multiple_choice": "choices", "extraction": "triples", "generation": "answer",
          "perplexity": "text", "minimal_pairs": "stereotyped"}
GENERATIVE = ("generation", "code", "extraction")
# HumanEval's stop sequences: the function body ends where a new top-level statement begins.
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
BUILTIN = resources.files("lmforge.eval") / "code_tasks"
PROBES = resources.files("lmforge.eval") / "probe_tasks"  # the bias probe's pairs (probes.py)
# The application recipes' held-out task files (NAME-eval.jsonl beside their training data).
APPLICATION_TASKS = resources.files("lmforge") / "recipes" / "finetune" / "data"


class TaskConfig(BaseModel):
    """A task file's settings, from its optional first line `{"config": {...}}`."""

    model_config = ConfigDict(extra="forbid")

    metric: list[str] | None = None  # default: exact_match (generation), pass@k (code)
    stop: list[str] | None = None  # default: a newline (generation), CODE_STOP (code)
    max_tokens: int | None = Field(None, ge=1)  # default: 32 (generation), 256 (code)
    n: int = Field(1, ge=1, le=1000)  # samples per example
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None  # default: the run's seed
    chat: bool = False  # render the prompt with the model's chat template, as user turns
    delimiter: str | None = None  # default: by the context's last character
    k: list[int] | None = None  # pass@k; default: 1, 10, 100 up to n
    timeout: float = Field(10.0, gt=0.0, le=600.0)  # seconds per program (code)
    constrained: bool = False  # extraction: decode under the triples JSON schema (triples.SCHEMA)
    perturb: list[str] | None = None  # perturbation probes run with the task (perturb.PERTURBATIONS)

    @field_validator("perturb", mode="before")
    @classmethod
    def _perturbations(cls, v):
        try:
            return perturb.parse(v)
        except LmforgeError as e:
            raise ValueError(str(e)) from None

    @field_validator("metric", "stop", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


APPLIES = {"multiple_choice": {"delimiter", "perturb"}, "perplexity": set(), "minimal_pairs": set(),
           "generation": set(TaskConfig.model_fields) - {"k", "timeout", "constrained"},
           "extraction": set(TaskConfig.model_fields) - {"k", "timeout"},
           "code": set(TaskConfig.model_fields) - {"chat", "delimiter", "constrained", "perturb"}}
METRICS = {"code": CODE_METRICS, "extraction": triples.METRICS}


def _check_config(raw: Any, task_type: str, where: str) -> TaskConfig:
    if not isinstance(raw, dict):
        raise LmforgeError(f"{where}: 'config' must be a JSON object")
    try:
        config = TaskConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise LmforgeError(f"{where}: config {loc}: {err['msg']}") from None
    wrong = sorted(set(raw) - APPLIES[task_type])
    if wrong:
        raise LmforgeError(f"{where}: config {', '.join(wrong)} does not apply to a {task_type.replace('_', '-')} "
                           f"task (it takes {', '.join(sorted(APPLIES[task_type])) or 'no settings'})")
    known = METRICS.get(task_type, TEXT_METRICS)
    for m in config.metric or []:
        if m not in known:
            raise LmforgeError(f"{where}: unknown metric {m!r} for a {task_type} task; choose from {', '.join(known)}")
    if config.n > 1 and config.temperature == 0:
        raise LmforgeError(f"{where}: n={config.n} samples need a temperature > 0 (greedy samples are all the same)")
    for k in config.k or []:
        if not 1 <= k <= config.n:
            raise LmforgeError(f"{where}: pass@{k} needs k between 1 and n={config.n} (set n, the samples per problem)")
    return config


def delimiter(context: str, config: TaskConfig) -> str:
    """What goes between a context and its answer: the file's choice, else none after a space
    or a CJK character (中文的答案直接接在后面), else one space."""
    if config.delimiter is not None:
        return config.delimiter
    return "" if not context or context[-1].isspace() or is_cjk(context[-1]) else " "


@dataclass
class Task:
    name: str
    type: str
    examples: list[dict[str, Any]]
    path: Path | None = None
    config: TaskConfig = field(default_factory=TaskConfig)
    # A perturbed task (perturb.py): its few-shot examples come from the clean ones, example i's
    # as for clean example origin[i].
    shot_pool: list[dict[str, Any]] | None = None
    origin: list[int] | None = None

    def shots(self, index: int, k: int, seed: int) -> list[dict[str, Any]]:
        """`k` solved examples other than `index`, the same for a given (index, seed)."""
        pool = self.examples if self.shot_pool is None else self.shot_pool
        if self.origin is not None:
            index = self.origin[index]
        if k == 0:
            return []
        if k >= len(pool):
            raise LmforgeError(f"task {self.name}: {k} few-shot examples asked for, but the file has only "
                               f"{len(pool)} examples (one is being evaluated)")
        others = [j for j in range(len(pool)) if j != index]
        return [pool[j] for j in random.Random(seed * 1_000_003 + index).sample(others, k)]


def context_of(example: dict[str, Any], task_type: str) -> str:
    return example["prompt" if task_type == "code" else "context"]


def answer_of(example: dict[str, Any], task_type: str) -> str:
    if task_type == "multiple_choice":
        return example["choices"][example["gold"]]
    if task_type == "code":
        if "canonical_solution" not in example:
            raise LmforgeError("few-shot code prompts need a 'canonical_solution' in every example")
        return example["canonical_solution"]
    if task_type == "extraction":
        return triples.dumps([triples.as_triple(t) for t in example["triples"]])
    answer = example["answer"]
    return answer[0] if isinstance(answer, list) else answer


def solved(task: Task, example: dict[str, Any]) -> str:
    """A few-shot example: its context, the delimiter, its answer."""
    context = context_of(example, task.type)
    sep = "" if task.type == "code" else delimiter(context, task.config)
    return context + sep + answer_of(example, task.type)


def build_prompt(task: Task, index: int, num_fewshot: int = 0, seed: int = 1234) -> str:
    shots = [solved(task, s) for s in task.shots(index, num_fewshot, seed)]
    return SHOT_SEPARATOR.join([*shots, context_of(task.examples[index], task.type)])


def _check_example(ex: Any, where: str, task_type: str | None) -> str:
    if not isinstance(ex, dict):
        raise LmforgeError(f"{where}: an example must be a JSON object, not {type(ex).__name__}")
    found = task_type or next((t for t, marker in MARKER.items() if marker in ex), None)
    if found is None:
        raise LmforgeError(f"{where}: cannot tell the task type: an example needs 'choices' (multiple choice), "
                           "'answer' (generation), 'entry_point' (code), 'triples' (extraction), 'text' (perplexity) "
                           "or 'stereotyped' (minimal pairs)")
    missing = [f for f in TYPES[found] if f not in ex]
    if missing:
        raise LmforgeError(f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                           f"(a {found.replace('_', '-')} example has {', '.join(TYPES[found])})")
    for f in TYPES[found]:
        texts = ("context", "text", "prompt", "test", "entry_point", *TYPES["minimal_pairs"])
        if f in texts and not (isinstance(ex[f], str) and ex[f]):
            raise LmforgeError(f"{where}: '{f}' must be a non-empty string")
    if found == "multiple_choice":
        choices = ex["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise LmforgeError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        gold = ex["gold"]
        if isinstance(gold, str):
            if gold not in choices:
                raise LmforgeError(f"{where}: gold {gold!r} is not one of the choices {choices}")
            ex["gold"] = choices.index(gold)
        elif isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise LmforgeError(f"{where}: gold {gold!r} is outside the choices (an index 0..{len(choices) - 1} "
                               "or one of the choice strings)")
    if found == "generation":
        answers = ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise LmforgeError(f"{where}: 'answer' must be a string or a non-empty list of strings")
    if found == "extraction":
        gold = ex["triples"]
        if not isinstance(gold, list) or any(triples.as_triple(t) is None for t in gold):
            raise LmforgeError(f"{where}: 'triples' must be a list (empty allowed) of "
                               '{"head": ..., "relation": ..., "tail": ...} objects with non-empty strings')
    return found


def _builtin_files() -> dict[str, Path]:
    files = {p.name.removesuffix(".jsonl"): Path(str(p)) for p in BUILTIN.iterdir() if p.name.endswith(".jsonl")}
    files.update({p.name.removesuffix(".jsonl"): Path(str(p)) for p in APPLICATION_TASKS.iterdir()
                  if p.name.endswith("-eval.jsonl")})
    files.update({p.name.removesuffix(".jsonl"): Path(str(p)) for p in PROBES.iterdir() if p.name.endswith(".jsonl")})
    return files


def builtin_tasks() -> list[str]:
    return sorted(_builtin_files())


def load_task(path: str | Path) -> Task:
    """A task file; a name that is no file but a built-in task (`pycode`, an application's
    `translate-eval`...) loads the one lmforge ships."""
    path = Path(path)
    if not path.is_file() and str(path) in _builtin_files():
        path = _builtin_files()[str(path)]
    if not path.is_file():
        builtin = ", ".join(builtin_tasks())
        raise LmforgeError(f"task file {path} not found (built-in tasks: {builtin})")
    examples, task_type, raw_config = [], None, None
    with open(path, encoding="utf-8") as f:
        for n, ex in json_objects(f, str(path)):
            if set(ex) == {"config"}:
                if examples or raw_config is not None:
                    raise LmforgeError(f"{path}:{n}: the config line must be the file's first line")
                raw_config = (n, ex["config"])
                continue
            found = _check_example(ex, f"{path}:{n}", None)
            if task_type not in (None, found):
                raise LmforgeError(f"{path}:{n}: a {found.replace('_', '-')} example in a "
                                   f"{task_type.replace('_', '-')} task file; keep one type per file")
            task_type = found
            examples.append(ex)
    if not examples:
        raise LmforgeError(f"task file {path} has no examples")
    config = _check_config(raw_config[1], task_type, f"{path}:{raw_config[0]}") if raw_config else TaskConfig()
    return Task(path.stem, task_type, examples, path, config)


@dataclass
class TaskResult:
    task: str
    type: str
    examples: int
    num_fewshot: int
    metrics: dict[str, float]
    seconds: float
    predictions: list[Any] = field(default_factory=list, repr=False)
    details: dict[str, Any] = field(default_factory=dict)  # reported beside the metrics, not compared


    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = {"task": self.task, "type": self.type, "examples": self.examples, "num_fewshot": self.num_fewshot,
             **self.metrics, **self.details, "seconds": round(self.seconds, 3),
             "examples_per_s": round(self.examples / max(self.seconds, 1e-9), 2)}
        if self.type in (*GENERATIVE, "minimal_pairs"):
            d["metric_names"] = list(self.metrics)
        if with_predictions:
            d["predictions"] = self.predictions
        return d
