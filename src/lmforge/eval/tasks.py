"""Running benchmark tasks: multiple choice and perplexity here, generation and code in
generation.py, extraction in extraction.py, minimal pairs in probes.py; every task (and its
perturbed runs, perturb.py) on every model, the results table and JSON, per-example rows, the
HTML report (report.py).

The task files' format is in task_file.py.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval import perturb
from lmforge.eval.extraction import evaluate_extraction
from lmforge.eval.generation import evaluate_code, evaluate_generation
from lmforge.eval.probes import evaluate_minimal_pairs
from lmforge.eval.report import (compare, compare_html, compare_table, load_results, metric_names, read_examples,
                                 run_html)
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
    if task.type == "minimal_pairs":
        return evaluate_minimal_pairs(lm, task, batch_size, seed)
    if task.type in GENERATIVE:
        evaluate = {"code": evaluate_code, "generation": evaluate_generation, "extraction": evaluate_extraction}
        return evaluate[task.type](lm, task, num_fewshot, batch_size, seed)
    return evaluate_perplexity(lm, task)


def machine() -> dict[str, Any]:
    """Where a run ran, for its report."""
    import os
    from importlib.metadata import version

    import torch

    from lmforge.eval.compute import device_profile

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "lmforge": version("lmforge"),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": cuda,
            "device": device_profile("cpu")["name"] if cuda is None else cuda}


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
              with_predictions: bool = False, examples_dir: Path | None = None,
              perturbations: list[str] | None = None) -> dict[str, Any]:
    report, rows = evaluate_all(model_paths, task_paths, num_fewshot, batch_size, limit, seed, device,
                                with_predictions, perturbations)
    if examples_dir is not None:
        write_examples(report, rows, examples_dir)
    return report


def write_examples(report: dict[str, Any], rows: dict[str, list[dict[str, Any]]], examples_dir: Path) -> None:
    for name, task_rows in rows.items():
        _write_atomic(examples_dir / f"{name}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows))
    report["examples"] = {name: str(examples_dir / f"{name}.jsonl") for name in rows}


def evaluate_all(model_paths: list[Path], task_paths: list[Path], num_fewshot: int = 0, batch_size: int = 16,
                 limit: int | None = None, seed: int = 1234, device: str = "cpu", with_predictions: bool = False,
                 perturbations: list[str] | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every task on every model: {"models": [...], "results": {model: {task: metrics}}}, and
    every perturbed run (`perturbations`, and those a task file asks for) as a task of its own,
    TASK+NAME, with its metrics' drops from the clean run (`acc_drop`...). With `examples_dir`,
    each task's per-example rows (prompt, output, reference, scores; one row per model and
    example, its `model` named) go to `examples_dir/TASK.jsonl`."""
    import lmforge

    tasks = [load_task(p) for p in task_paths]  # validate every file before loading a model
    if limit is not None:
        tasks = [replace(t, examples=t.examples[:limit]) for t in tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise LmforgeError(f"two task files share a name ({', '.join(names)}); rename one")
    asked = perturb.parse(perturbations)
    plans = {t.name: list(dict.fromkeys([*asked, *(t.config.perturb or [])])) for t in tasks}
    for t in tasks:
        perturb.check(t, plans[t.name])
    results: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for t in tasks
                                  for name in (t.name, *(f"{t.name}{perturb.SEPARATOR}{p}" for p in plans[t.name]))}

    def run(lm, path: Path, task: Task) -> dict[str, Any]:
        result = evaluate_task(lm, task, num_fewshot, batch_size, None, seed)
        results[str(path)][task.name] = row = result.to_dict(with_predictions)
        rows[task.name] += [{"model": str(path), "task": task.name, **p} for p in result.predictions]
        return row

    for path in model_paths:
        lm = lmforge.load(path, device=device)
        results[str(path)] = {}
        for t in tasks:
            clean = run(lm, path, t)
            for name in plans[t.name]:
                row = run(lm, path, perturb.perturb_task(t, name, seed))
                row.update(perturbation=name, clean_task=t.name, **perturb.drops(clean, row, metric_names(clean)))
    report = {"models": [str(p) for p in model_paths], "num_fewshot": num_fewshot, "seed": seed, "results": results,
              "config": {"tasks": [str(p) for p in task_paths], "num_fewshot": num_fewshot, "batch_size": batch_size,
                         "limit": limit, "seed": seed, "device": device,
                         "perturb": {name: plan for name, plan in plans.items() if plan}},
              "machine": machine()}
    return report, rows


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
        for metric in metric_names(r):
            table.add_row(task, metric, *(f"{report['results'][m][task][metric]:.4f}" for m in models))
            if "perturbation" in r:
                table.add_row(task, f"{metric} drop", *(f"{report['results'][m][task][metric + '_drop']:+.4f}"
                                                        for m in models), style="italic")
        table.add_row(task, "examples/s", *(f"{report['results'][m][task]['examples_per_s']:.1f}" for m in models),
                      style="dim")
    return table


def eval_command(models: list[Path], task_paths: list[Path] | None, num_fewshot: int, batch_size: int,
                 limit: int | None, out: Path | None, as_json: bool, console, perturbations: str | None = None,
                 report_path: Path | None = None) -> dict[str, Any]:
    """`lmforge eval MODEL --tasks ... [--compare MODEL2|RESULTS.json] [--perturb ...] [--report R.html]`:
    run, print a table or JSON, write `out` and the HTML report (`report_path`, else beside `out`).
    Results files among the models are compared with the run (and each other) instead."""
    saved = [p for p in models if p.suffix == ".json"]  # a model is a directory
    to_run = [p for p in models if p not in saved]
    if to_run and not task_paths:
        raise LmforgeError(f"{to_run[0]} is a model to evaluate: give --tasks FILE.jsonl (or --data for perplexity); "
                           "to compare saved runs, give their results files: --compare A.json --compare B.json")
    sources: list[tuple[str, dict[str, Any]]] = [(str(p), load_results(p)) for p in saved]  # checked before running
    report: dict[str, Any] | None = None
    if to_run:
        report, rows = evaluate_all(to_run, task_paths or [], num_fewshot, batch_size, limit,
                                    perturbations=perturb.parse(perturbations))
        if out is not None:
            write_examples(report, rows, examples_dir_for(out))
            _write_atomic(out, json.dumps(report, indent=2, ensure_ascii=False))
        if not saved:
            page = report_path or (out.with_suffix(".html") if out is not None else None)
            if page is not None:
                _write_atomic(page, run_html(report, rows))
            if as_json:
                print(json.dumps(report))
            else:
                console.print(results_table(report))
                if out is not None:
                    console.print(f"results: {out}; what the model wrote, per example: {examples_dir_for(out)}/")
                if page is not None:
                    console.print(f"report: {page}")
            return report
        sources.insert(0, (str(out) if out is not None else "this run", report))
    comparison = compare(sources)
    if report_path is not None:
        # One saved run alone gets its own report again (worst examples from its example files).
        page = run_html(sources[0][1], read_examples(sources[0][1], saved[0])) if len(sources) == 1 \
            else compare_html(comparison)
        _write_atomic(report_path, page)
    if as_json:
        print(json.dumps({k: comparison[k] for k in ("columns", "rows")}))
    else:
        console.print(compare_table(comparison))
        if report_path is not None:
            console.print(f"report: {report_path}")
    return comparison
