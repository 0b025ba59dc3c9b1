"""A run's `metrics.jsonl` (one JSON object per logged step or validation) and its loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line; a log without a path (other ranks) writes nothing.

    A run that starts at `start_step` (0, or the step of the checkpoint it resumes from) first
    cuts the log back to the records up to that step: the steps after it ran in a process whose
    work is lost, and are about to run again."""

    def __init__(self, path: Path | None, start_step: int = 0):
        if path is not None and path.is_file():
            kept = [line + "\n" for line in path.read_text().splitlines()
                    if line.strip() and _step_of_record(line) <= start_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self._f = open(path, "a") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _step_of_record(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return math.inf


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`, each step once: a log written before resumes cut it back
    (see `MetricsLog`) can repeat steps, and then the last record of a step and kind (training
    or validation) is the one kept, at the place of the first. A line cut short is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records: dict[tuple[Any, bool], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records[(record["step"], "loss" in record)] = record
    return list(records.values())


def plot_losses(run_dir: Path) -> Path | None:
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    from lmforge.plotting import pyplot

    plt = pyplot()  # headless, with a CJK fallback font

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
