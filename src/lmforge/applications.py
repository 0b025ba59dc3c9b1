"""The application recipes and how each is measured, before and after fine-tuning.

Each application is a built-in fine-tuning recipe (`recipes/finetune/NAME.yaml`) whose data
sits beside it with an eval task file, `data/NAME-eval.jsonl`, held out from training:

| recipe | task file type | metrics |
|---|---|---|
| translate | generation | BLEU, chrF (sacrebleu, zh tokenizer for Chinese references) |
| summarize | generation | ROUGE-1/2/L (CJK-aware) |
| code-completion | code | pass@1, pass@5 (sandbox) |
| relation-extraction | extraction | triple precision/recall/F1 |
| sentiment | multiple choice (+ `text`) | accuracy, macro-F1 |
| support-chat | generation, chat template | ROUGE-L, exact match |

A language model is measured with `lmforge eval`'s task runner. A classifier (a model
directory with `head.json`, what the sentiment recipe trains) is measured by its head's
predictions on the examples' `text`; a language model on the same file by multiple choice
over the label words, so a base model has a score before it has a head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.task_file import load_task
from lmforge.train.finetune import RECIPES

APPLICATIONS = ("translate", "summarize", "code-completion", "relation-extraction", "sentiment", "support-chat")
HEADLINE = {"translate": "chrf", "summarize": "rougeL", "code-completion": "pass@1",
            "relation-extraction": "triple_f1", "sentiment": "macro_f1", "support-chat": "rougeL"}


def task_file(name: str) -> Path:
    if name not in APPLICATIONS:
        raise LmforgeError(f"unknown application {name!r}; choose from {', '.join(APPLICATIONS)}")
    return RECIPES / "data" / f"{name}-eval.jsonl"


def label_scores(predicted: list[str], gold: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of label predictions (labels as strings)."""
    from lmforge.model.heads import accuracy, macro_f1

    labels = sorted(set(gold) | set(predicted))
    pred, ref = [labels.index(p) for p in predicted], [labels.index(g) for g in gold]
    return {"accuracy": accuracy(pred, ref), "macro_f1": macro_f1(pred, ref, len(labels))}


def _classifier_scores(model: Path, examples: list[dict[str, Any]]) -> dict[str, float]:
    from lmforge.train.classify import load_task_model

    tuned = load_task_model(model)
    gold = [ex["choices"][ex["gold"]] for ex in examples]
    missing = sorted(set(gold) - set(tuned.labels))
    if missing:
        raise LmforgeError(f"{model}'s head has labels {tuned.labels}; the task's gold labels {missing} "
                           "are not among them")
    return label_scores(tuned.classify([ex["text"] for ex in examples]), gold)


def evaluate_application(name: str, model: Path, limit: int | None = None, batch_size: int = 16,
                         seed: int = 1234) -> dict[str, float]:
    """The application's metrics for a model directory (a language model, or a classifier)."""
    import lmforge
    from lmforge.eval.tasks import evaluate_task

    task = load_task(task_file(name))
    examples = task.examples[:limit] if limit is not None else task.examples
    if (Path(model) / "head.json").is_file():
        if task.type != "multiple_choice" or any("text" not in ex for ex in examples):
            raise LmforgeError(f"{model} is a classifier; application {name} is not measured by classification")
        return _classifier_scores(Path(model), examples)
    result = evaluate_task(lmforge.load(model), task, batch_size=batch_size, limit=limit, seed=seed)
    metrics = dict(result.metrics)
    if task.type == "multiple_choice":
        pick = [p["choices"][p["pred"]] for p in result.predictions]
        metrics = label_scores(pick, [ex["choices"][ex["gold"]] for ex in examples])
    return metrics


def before_after(name: str, base: Path, out: Path, overrides: list[str] | None = None, limit: int | None = None,
                 log=print) -> dict[str, Any]:
    """Evaluate `base`, fine-tune the recipe from it (runs under `out`, recipe overrides as
    `--section.key value` flags), evaluate the result: {recipe, steps, train_s, train_loss,
    before, after}."""
    import time

    from lmforge.train.finetune import finetune, load_finetune_config

    before = evaluate_application(name, base, limit=limit)
    cfg = load_finetune_config(name, [f"--base={base}", f"--run.out={out}", f"--run.name={name}", *(overrides or [])])
    start = time.perf_counter()
    result = finetune(cfg, progress=False, log=lambda s: None)
    train_s = time.perf_counter() - start
    after = evaluate_application(name, result.output, limit=limit)
    metric = HEADLINE[name]
    log(f"{name}: {result.steps} steps in {train_s:.0f} s, train loss {result.train_loss:.3f}; "
        f"{metric} {before[metric]:.4f} -> {after[metric]:.4f}")
    return {"recipe": name, "steps": result.steps, "train_s": round(train_s, 1), "train_loss": result.train_loss,
            "output": str(result.output), "before": before, "after": after}


def before_after_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per recipe and metric."""
    lines = ["| recipe | metric | before | after |", "|---|---|---|---|"]
    for r in rows:
        for metric, value in r["before"].items():
            if metric in r["after"]:
                lines.append(f"| {r['recipe']} | {metric} | {value:.4f} | {r['after'][metric]:.4f} |")
    return "\n".join(lines)
