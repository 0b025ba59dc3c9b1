"""`lmforge plot RUN...`: training curves from `metrics.jsonl`, several runs overlaid.

Writes one PNG per panel (loss with validation, learning rate, gradient norm, throughput)
and `dashboard.png` with all four; each run's legend entry carries its compute summary
(`summary.json`: total FLOPs, MFU, energy) when the run finished. Reinforcement-learning runs
(`lmforge finetune --task grpo`) add `rl.png` and a PNG per panel of theirs: the reward (with
each reward function's mean), the KL to the reference, the clip fraction, the completion length
and the seconds per step spent sampling (rollout) and updating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.compute import read_summary
from lmforge.train.metrics import read_metrics

PANELS = {  # file stem -> (metric key, y label, log scale)
    "loss": ("loss", "loss (nats/token)", False),
    "lr": ("lr", "learning rate", False),
    "grad_norm": ("grad_norm", "gradient norm (before clipping)", True),
    "throughput": ("tokens_per_s", "tokens/s", False),
}
RL_PANELS = {  # drawn when a run's records have a reward (task grpo)
    "reward": ("reward", "reward (rollout mean)", False),
    "kl": ("kl", "KL to the reference (k3)", False),
    "clip_fraction": ("clip_fraction", "clipped token fraction", False),
    "completion_tokens": ("completion_tokens", "completion tokens", False),
    "step_seconds": ("rollout_s", "seconds per step", False),
}
# Further series drawn in a panel: (metric key or key prefix, line style, label suffix).
EXTRA_SERIES = {"reward": ("reward/", ":", ""), "step_seconds": ("update_s", "--", " update")}


def _label(run_dir: Path) -> str:
    summary = read_summary(run_dir)
    if not summary:
        return run_dir.name
    mfu = f", MFU {summary['mfu'] * 100:.1f}%" if summary.get("mfu") else ""
    return f"{run_dir.name} ({summary['total_flops']:.2g} FLOPs{mfu}, {summary['energy_kwh'] * 1000:.2g} Wh)"


def _draw(ax, runs: list[tuple[Path, list[dict[str, Any]]]], stem: str) -> None:
    key, ylabel, log = {**PANELS, **RL_PANELS}[stem]
    for i, (run_dir, records) in enumerate(runs):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            suffix = " rollout" if stem == "step_seconds" else ""
            ax.plot(*zip(*points), label=_label(run_dir) if stem == "loss" else run_dir.name + suffix, color=f"C{i}")
        if stem in EXTRA_SERIES:
            prefix, style, suffix = EXTRA_SERIES[stem]
            names = sorted({k for r in records for k in r
                            if k == prefix or (prefix.endswith("/") and k.startswith(prefix) and not k.endswith("_std"))})
            for name in names:
                extra = [(r["step"], r[name]) for r in records if name in r]
                label = f"{run_dir.name} {name}" if prefix.endswith("/") else f"{run_dir.name}{suffix}"
                ax.plot(*zip(*extra), linestyle=style, color=f"C{i}", label=label)
        if stem == "loss":
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), marker="o", linestyle="--", color=f"C{i}", label=f"{run_dir.name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """Draw the panels for `run_dirs` into `out`; returns the PNG paths (dashboard.png first)."""
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "metrics.jsonl").is_file():
            raise LmforgeError(f"{d} has no metrics.jsonl: give a run directory written by lmforge train")
        records = read_metrics(d)
        if not any("loss" in r for r in records):
            raise LmforgeError(f"{d}/metrics.jsonl has no training records yet")
        runs.append((d, records))
    from lmforge.plotting import pyplot

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, stem in zip(axes.flat, PANELS):
        _draw(ax, runs, stem)
    fig.suptitle(" vs ".join(d.name for d, _ in runs))
    fig.tight_layout()
    paths = [out / "dashboard.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    panels = list(PANELS)
    if any("reward" in r for _, records in runs for r in records):
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        for ax, stem in zip(axes.flat, RL_PANELS):
            _draw(ax, runs, stem)
        axes.flat[-1].axis("off")
        fig.suptitle(" vs ".join(d.name for d, _ in runs) + ": rollouts")
        fig.tight_layout()
        paths.append(out / "rl.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
        panels += list(RL_PANELS)
    for stem in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        _draw(ax, runs, stem)
        fig.tight_layout()
        paths.append(out / f"{stem}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def plot_command(runs: list[Path], out: Path, console) -> None:
    from lmforge.eval.compute import describe_run

    paths = plot_runs(runs, out)
    for run in runs:
        console.print(f"{run}: {describe_run(run)}", highlight=False)
    console.print(f"plots: {', '.join(str(p) for p in paths)}", highlight=False)
