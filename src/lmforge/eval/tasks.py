"""Running benchmark tasks: multiple choice and perplexity here, generation and code in
generation.py, extraction in extraction.py; every task on every model, the results table and JSON, per-example rows.

The task files' format is in task_file.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.extraction import evaluate_extraction
from lmforge.eval.generation import evaluate_code, evaluate_generation
from lmforge.eval.scoring import rolling_logprob, score_requests
from lmforge.eval.task_file import GENERATIVE, Task, TaskResult, build_prompt, delimiter, load_task


def _context_ids(tokenizer, text: str) -> tuple[list[int], str]:
    """Encode a context; trailing spaces move to the continuation (how BPE tokenizers
    split ' word'), as lm-eval does."""
    stripped = text.rstrip(" ")
    return tokenizer.encode(stripped), text[len(stripped):]


def evaluate_multiple_choice(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16,
                             seed: int = 1234) -> TaskResult:
    tok = lm.tokenizer
    requests, spans, names = [], [], []
    prompts = []
    for i, ex in enumerate(task.examples):
        prompts.append(build_prompt(task, i, num_fewshot, seed))
        ctx, moved = _context_ids(tok, prompts[-1])
        sep = delimiter(prompts[-1], task.config)
        spans.append((len(requests), len(ex["choices"])))
        for c in ex["choices"]:
            requests.append((ctx, tok.encode(moved + sep + c)))
            names.append(f"task {task.name}, example {i + 1}")
    start = time.perf_counter()
    scores = score_requests(lm.model, requests, batch_size=batch_size, pad_id=tok.pad_id or 0,
                            names=lambda r: names[r])
    seconds = time.perf_counter() - start
    acc = acc_norm = 0
    predictions = []
    for i, (ex, (s, n)) in enumerate(zip(task.examples, spans)):
        ll = [sc.logprob for sc in scores[s:s + n]]
        per_byte = [v / len(c.encode("utf-8")) for v, c in zip(ll, ex["choices"])]
        pick, pick_norm = max(range(n), key=ll.__getitem__), max(range(n), key=per_byte.__getitem__)
        acc += pick == ex["gold"]
        acc_norm += pick_norm == ex["gold"]
        predictions.append({"index": i, "prompt": prompts[i], "choices": ex["choices"], "gold": ex["gold"],
                            "pred": pick, "pred_norm": pick_norm, "loglikelihoods": ll, "acc": float(pick == ex["gold"]),
                            "acc_norm": float(pick_norm == ex["gold"])})
    n = len(task.examples)
    return TaskResult(task.name, task.type, n, num_fewshot, {"acc": acc / n, "acc_norm": acc_norm / n},
                      seconds, predictions)


def evaluate_perplexity(lm, task: Task) -> TaskResult:
    tok = lm.tokenizer
    bos = tok.eos_id if tok.eos_id is not None else (tok.bos_id or 0)
    start = time.perf_counter()
    nll = tokens = nbytes = 0
    predictions = []
    for i, ex in enumerate(task.examples):
        ids = tok.encode(ex["text"])
        example_nll = -rolling_logprob(lm.model, ids, bos)
        nll += example_nll
        tokens += len(ids)
        nbytes += len(ex["text"].encode("utf-8"))
        predictions.append({"index": i, "text": ex["text"], "tokens": len(ids),
                            "loss": example_nll / max(len(ids), 1)})
    seconds = time.perf_counter() - start
    loss = nll / max(tokens, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nll / math.log(2) / nbytes,
               "tokens": tokens}
    return TaskResult(task.name, task.type, len(task.examples), 0, metrics, seconds, predictions)


def evaluate_task(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, limit: int | None = None,
                  seed: int = 1234) -> TaskResult:
    if limit is not None:
        task = Task(task.name, task.type, task.examples[:limit], task.path, task.config)
    if task.type == "multiple_choice":
        return evaluate_multiple_choice(lm, task, num_fewshot, batch_size, seed)
    if task.type in GENERATIVE:
        evaluate = {"code": evaluate_code, "generation": evaluate_generation, "extraction": evaluate_extraction}
        return evaluate[task.type](lm, task, num_fewshot, batch_size, seed)
    return evaluate_perplexity(lm, task)


MAIN_METRIC = {"multiple_choice": ("acc", "acc_norm"), "perplexity": ("perplexity", "bits_per_byte")}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def examples_dir_for(out: Path) -> Path:
    """Where the per-example outputs of the report `out` go: `results.json` -> `results.examples/`."""
    return out.parent / f"{out.stem}.examples"


def run_tasks(model_paths: list[Path], task_paths: list[Path], num_fewshot: int = 0, batch_size: int = 16,
              limit: int | None = None, seed: int = 1234, device: str = "cpu",
              with_predictions: bool = False, examples_dir: Path | None = None) -> dict[str, Any]:
    """Every task on every model: {"models": [...], "results": {model: {task: metrics}}}. With
    `examples_dir`, each task's per-example rows (prompt, output, reference, scores; one row per
    model and example, its `model` named) go to `examples_dir/TASK.jsonl`."""
    import lmforge

    tasks = [load_task(p) for p in task_paths]  # validate every file before loading a model
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise LmforgeError(f"two task files share a name ({', '.join(names)}); rename one")
    results: dict[str, Any] = {}
    rows: dict[str, list[str]] = {t.name: [] for t in tasks}
    for path in model_paths:
        lm = lmforge.load(path, device=device)
        results[str(path)] = {}
        for t in tasks:
            result = evaluate_task(lm, t, num_fewshot, batch_size, limit, seed)
            results[str(path)][t.name] = result.to_dict(with_predictions)
            rows[t.name] += [json.dumps({"model": str(path), "task": t.name, **p}, ensure_ascii=False)
                             for p in result.predictions]
    report = {"models": [str(p) for p in model_paths], "num_fewshot": num_fewshot, "seed": seed, "results": results}
    if examples_dir is not None:
        for name, lines in rows.items():
            _write_atomic(examples_dir / f"{name}.jsonl", "".join(line + "\n" for line in lines))
        report["examples"] = {name: str(examples_dir / f"{name}.jsonl") for name in rows}
    return report


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
        for metric in MAIN_METRIC.get(r["type"]) or r["metric_names"]:
            table.add_row(task, metric, *(f"{report['results'][m][task][metric]:.4f}" for m in models))
        table.add_row(task, "examples/s", *(f"{report['results'][m][task]['examples_per_s']:.1f}" for m in models),
                      style="dim")
    return table


def eval_command(models: list[Path], task_paths: list[Path], num_fewshot: int, batch_size: int,
                 limit: int | None, out: Path | None, as_json: bool, console) -> dict[str, Any]:
    """`lmforge eval MODEL --tasks ... [--compare MODEL2]`: run, print a table or JSON, write `out`."""
    report = run_tasks(models, task_paths, num_fewshot, batch_size, limit,
                       examples_dir=examples_dir_for(out) if out is not None else None)
    if out is not None:
        _write_atomic(out, json.dumps(report, indent=2, ensure_ascii=False))
    if as_json:
        print(json.dumps(report))
    else:
        console.print(results_table(report))
        if out is not None:
            console.print(f"results: {out}; what the model wrote, per example: {examples_dir_for(out)}/")
    return report
