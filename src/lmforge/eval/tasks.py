"""Benchmark tasks from local JSONL files: multiple choice, exact-match generation, perplexity.

One example per line; the fields decide the task type (all examples of a file must agree):

    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}   multiple choice
    {"context": "2 + 2 =", "answer": "4"}                  generation (answer: a string or a list)
    {"text": "Any document ..."}                            perplexity and bits per byte

Multiple choice scores each choice by log P(" " + choice | context) (the choice follows
the context after one space, lm-eval's target delimiter): `acc` takes the highest
log-likelihood, `acc_norm` the highest log-likelihood per UTF-8 byte of the choice.
Generation decodes greedily until a newline and compares the stripped text to the answer.
Few-shot prompts put `num_fewshot` other solved examples of the same file (drawn with a
fixed seed) before the context, separated by blank lines.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.jsonl import json_objects
from lmforge.errors import LmforgeError
from lmforge.eval.scoring import fit_context, rolling_logprob, score_requests

DELIMITER = " "  # between a context and its choice/answer
SHOT_SEPARATOR = "\n\n"
TYPES = {"multiple_choice": ("context", "choices", "gold"), "generation": ("context", "answer"),
         "perplexity": ("text",)}
MARKER = {"multiple_choice": "choices", "generation": "answer", "perplexity": "text"}  # the field that tells


@dataclass
class Task:
    name: str
    type: str
    examples: list[dict[str, Any]]
    path: Path | None = None

    def shots(self, index: int, k: int, seed: int) -> list[dict[str, Any]]:
        """`k` solved examples other than `index`, the same for a given (index, seed)."""
        if k == 0:
            return []
        if k >= len(self.examples):
            raise LmforgeError(f"task {self.name}: {k} few-shot examples asked for, but the file has only "
                               f"{len(self.examples)} examples (one is being evaluated)")
        others = [j for j in range(len(self.examples)) if j != index]
        return [self.examples[j] for j in random.Random(seed * 1_000_003 + index).sample(others, k)]


def _answer(example: dict[str, Any], task_type: str) -> str:
    if task_type == "multiple_choice":
        return example["choices"][example["gold"]]
    answer = example["answer"]
    return answer[0] if isinstance(answer, list) else answer


def build_prompt(task: Task, index: int, num_fewshot: int = 0, seed: int = 1234) -> str:
    shots = [s["context"] + DELIMITER + _answer(s, task.type) for s in task.shots(index, num_fewshot, seed)]
    return SHOT_SEPARATOR.join([*shots, task.examples[index]["context"]])


def _check_example(ex: Any, where: str, task_type: str | None) -> str:
    if not isinstance(ex, dict):
        raise LmforgeError(f"{where}: an example must be a JSON object, not {type(ex).__name__}")
    found = task_type or next((t for t, marker in MARKER.items() if marker in ex), None)
    if found is None:
        raise LmforgeError(f"{where}: cannot tell the task type: an example needs 'choices' (multiple choice), "
                           "'answer' (generation) or 'text' (perplexity)")
    missing = [f for f in TYPES[found] if f not in ex]
    if missing:
        raise LmforgeError(f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                           f"(a {found.replace('_', '-')} example has {', '.join(TYPES[found])})")
    for f in TYPES[found]:
        if f in ("context", "text") and not (isinstance(ex[f], str) and ex[f]):
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
    return found


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"task file {path} not found")
    examples, task_type = [], None
    with open(path, encoding="utf-8") as f:
        for n, ex in json_objects(f, str(path)):
            found = _check_example(ex, f"{path}:{n}", None)
            if task_type not in (None, found):
                raise LmforgeError(f"{path}:{n}: a {found.replace('_', '-')} example in a "
                                   f"{task_type.replace('_', '-')} task file; keep one type per file")
            task_type = found
            examples.append(ex)
    if not examples:
        raise LmforgeError(f"task file {path} has no examples")
    return Task(path.stem, task_type, examples, path)


@dataclass
class TaskResult:
    task: str
    type: str
    examples: int
    num_fewshot: int
    metrics: dict[str, float]
    seconds: float
    predictions: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = {"task": self.task, "type": self.type, "examples": self.examples, "num_fewshot": self.num_fewshot,
             **self.metrics, "seconds": round(self.seconds, 3),
             "examples_per_s": round(self.examples / max(self.seconds, 1e-9), 2)}
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def _context_ids(tokenizer, text: str) -> tuple[list[int], str]:
    """Encode a context; trailing spaces move to the continuation (how BPE tokenizers
    split ' word'), as lm-eval does."""
    stripped = text.rstrip(" ")
    return tokenizer.encode(stripped), text[len(stripped):]


def evaluate_multiple_choice(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16,
                             seed: int = 1234) -> TaskResult:
    tok = lm.tokenizer
    requests, spans, names = [], [], []
    for i, ex in enumerate(task.examples):
        ctx, moved = _context_ids(tok, build_prompt(task, i, num_fewshot, seed))
        spans.append((len(requests), len(ex["choices"])))
        for c in ex["choices"]:
            requests.append((ctx, tok.encode(moved + DELIMITER + c)))
            names.append(f"task {task.name}, example {i + 1}")
    start = time.perf_counter()
    scores = score_requests(lm.model, requests, batch_size=batch_size, pad_id=tok.pad_id or 0,
                            names=lambda r: names[r])
    seconds = time.perf_counter() - start
    acc = acc_norm = 0
    predictions = []
    for ex, (s, n) in zip(task.examples, spans):
        ll = [sc.logprob for sc in scores[s:s + n]]
        per_byte = [v / len(c.encode("utf-8")) for v, c in zip(ll, ex["choices"])]
        pick, pick_norm = max(range(n), key=ll.__getitem__), max(range(n), key=per_byte.__getitem__)
        acc += pick == ex["gold"]
        acc_norm += pick_norm == ex["gold"]
        predictions.append({"loglikelihoods": ll, "pred": pick, "pred_norm": pick_norm, "gold": ex["gold"]})
    n = len(task.examples)
    return TaskResult(task.name, task.type, n, num_fewshot, {"acc": acc / n, "acc_norm": acc_norm / n},
                      seconds, predictions)


def evaluate_generation(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, seed: int = 1234,
                        max_new_tokens: int = 32, stop: tuple[str, ...] = ("\n",)) -> TaskResult:
    limit = lm.config.context
    prompts = []
    for i in range(len(task.examples)):
        ids = lm.tokenizer.encode(build_prompt(task, i, num_fewshot, seed))
        fit_context(ids, [0], limit, truncate=False, what=f"task {task.name}, example {i + 1} (prompt + 1 token)")
        prompts.append(ids)
    start = time.perf_counter()
    texts = []
    for b in range(0, len(prompts), batch_size):
        texts += [c.text for c in lm.complete(prompts[b:b + batch_size], max_new_tokens=max_new_tokens,
                                              temperature=0.0, stop=list(stop))]
    seconds = time.perf_counter() - start
    hits, predictions = 0, []
    for ex, text in zip(task.examples, texts):
        answers = ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]]
        hit = text.strip() in [a.strip() for a in answers]
        hits += hit
        predictions.append({"output": text, "exact_match": hit})
    n = len(task.examples)
    return TaskResult(task.name, task.type, n, num_fewshot, {"exact_match": hits / n}, seconds, predictions)


def evaluate_perplexity(lm, task: Task) -> TaskResult:
    tok = lm.tokenizer
    bos = tok.eos_id if tok.eos_id is not None else (tok.bos_id or 0)
    start = time.perf_counter()
    nll = tokens = nbytes = 0
    for ex in task.examples:
        ids = tok.encode(ex["text"])
        nll -= rolling_logprob(lm.model, ids, bos)
        tokens += len(ids)
        nbytes += len(ex["text"].encode("utf-8"))
    seconds = time.perf_counter() - start
    loss = nll / max(tokens, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nll / math.log(2) / nbytes,
               "tokens": tokens}
    return TaskResult(task.name, task.type, len(task.examples), 0, metrics, seconds)


def evaluate_task(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, limit: int | None = None,
                  seed: int = 1234) -> TaskResult:
    if limit is not None:
        task = Task(task.name, task.type, task.examples[:limit], task.path)
    if task.type == "multiple_choice":
        return evaluate_multiple_choice(lm, task, num_fewshot, batch_size, seed)
    if task.type == "generation":
        return evaluate_generation(lm, task, num_fewshot, batch_size, seed)
    return evaluate_perplexity(lm, task)


MAIN_METRIC = {"multiple_choice": ("acc", "acc_norm"), "generation": ("exact_match",),
               "perplexity": ("perplexity", "bits_per_byte")}


def run_tasks(model_paths: list[Path], task_paths: list[Path], num_fewshot: int = 0, batch_size: int = 16,
              limit: int | None = None, seed: int = 1234, device: str = "cpu",
              with_predictions: bool = False) -> dict[str, Any]:
    """Every task on every model: {"models": [...], "results": {model: {task: metrics}}}."""
    import lmforge

    tasks = [load_task(p) for p in task_paths]  # validate every file before loading a model
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise LmforgeError(f"two task files share a name ({', '.join(names)}); rename one")
    results: dict[str, Any] = {}
    for path in model_paths:
        lm = lmforge.load(path, device=device)
        results[str(path)] = {t.name: evaluate_task(lm, t, num_fewshot, batch_size, limit, seed).to_dict(with_predictions)
                              for t in tasks}
    return {"models": [str(p) for p in model_paths], "num_fewshot": num_fewshot, "seed": seed, "results": results}


def results_table(report: dict[str, Any]):
    """A rich Table: one row per (task, metric), one column per model."""
    from rich.table import Table

    table = Table(title=f"{report['num_fewshot']}-shot" if report["num_fewshot"] else "zero-shot")
    table.add_column("task")
    table.add_column("metric")
    models = report["models"]
    for m in models:
        table.add_column(m, justify="right")
    first = report["results"][models[0]]
    for task, r in first.items():
        for metric in MAIN_METRIC[r["type"]]:
            table.add_row(task, metric, *(f"{report['results'][m][task][metric]:.4f}" for m in models))
        table.add_row(task, "examples/s", *(f"{report['results'][m][task]['examples_per_s']:.1f}" for m in models),
                      style="dim")
    return table


def eval_command(models: list[Path], task_paths: list[Path], num_fewshot: int, batch_size: int,
                 limit: int | None, out: Path | None, as_json: bool, console) -> dict[str, Any]:
    """`lmforge eval MODEL --tasks ... [--compare MODEL2]`: run, print a table or JSON, write `out`."""
    report = run_tasks(models, task_paths, num_fewshot, batch_size, limit)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)
    if as_json:
        print(json.dumps(report))
    else:
        console.print(results_table(report))
        if out is not None:
            console.print(f"results: {out}")
    return report
