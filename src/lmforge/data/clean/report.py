"""The run's report: `stats.json` (counts that add up), PNG histograms, a summary table."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from rich.table import Table

from lmforge.data.clean.stats import LENGTH_BINS, SCORE_BINS


def finish_stats(stats: dict, plan: dict, parts: list[str], dedup: dict, steps: list[str], elapsed: float) -> dict:
    """Order the steps as they ran, add totals and the accounting check."""
    ordered = {name: stats["steps"][name] for name in steps if name in stats["steps"]}
    removed = sum(step["docs_removed"] for step in ordered.values())
    last = ordered[steps[-1]] if steps else None
    docs_out = sum(stats["histograms"]["chars_out"])
    chars_out = last["chars_out"] if last else stats["chars_read"]
    return {
        "complete": True,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "fingerprint": plan["fingerprint"],
        "inputs": {"files": plan["files"], "bytes": plan["bytes"], "shards": plan["fingerprint"]["shards"],
                   "skipped_files": plan["skipped_files"]},
        "docs_read": stats["docs_read"],
        "chars_read": stats["chars_read"],
        "docs_out": docs_out,
        "chars_out": chars_out,
        "docs_removed": removed,
        # every document read is written or removed by exactly one step
        "accounting_ok": stats["docs_read"] == docs_out + removed,
        "reader_issues": stats["reader_issues"],
        "steps": ordered,
        "pii_replaced": stats["pii"],
        "languages": dict(sorted(stats["languages"].items(), key=lambda kv: -kv[1])),
        "dedup": dedup,
        "outputs": parts,
        "histograms": stats["histograms"],
    }


def write_plots(stats: dict, folder: Path) -> list[str]:
    from lmforge.plotting import pyplot

    plt = pyplot()  # headless, with a CJK fallback font

    folder.mkdir(parents=True, exist_ok=True)
    hist = stats["histograms"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    edges = [10 ** (i / 4) for i in range(LENGTH_BINS + 1)]
    centers = [(a * b) ** 0.5 for a, b in zip(edges, edges[1:])]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(centers, hist["chars_read"], width=widths, alpha=0.5, label="read", align="center")
    ax.bar(centers, hist["chars_out"], width=widths, alpha=0.7, label="kept", align="center")
    ax.set_xscale("log")
    used = [i for i, (a, b) in enumerate(zip(hist["chars_read"], hist["chars_out"])) if a or b]
    if used:
        ax.set_xlim(edges[max(0, used[0] - 1)], edges[min(LENGTH_BINS, used[-1] + 2)])
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("Document lengths, read vs kept")
    fig.tight_layout()
    fig.savefig(folder / "lengths.png", dpi=100)
    plt.close(fig)
    written.append("plots/lengths.png")

    if any(hist["lang_score"]):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([(i + 0.5) / SCORE_BINS for i in range(SCORE_BINS)], hist["lang_score"], width=1 / SCORE_BINS)
        ax.set_xlabel("language-ID probability of the top language")
        ax.set_ylabel("documents")
        ax.set_title("Language identification confidence")
        fig.tight_layout()
        fig.savefig(folder / "lang_score.png", dpi=100)
        plt.close(fig)
        written.append("plots/lang_score.png")

    names = list(stats["steps"])
    if names:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
        ax.barh(names[::-1], [stats["steps"][n]["docs_removed"] for n in names[::-1]])
        ax.set_xlabel("documents removed")
        ax.set_title("Documents removed per step")
        fig.tight_layout()
        fig.savefig(folder / "removed.png", dpi=100)
        plt.close(fig)
        written.append("plots/removed.png")
    return written


def summary_table(stats: dict) -> Table:
    """One row per step: documents in, removed (and the top reasons), characters out."""
    table = Table(title=f"lmforge data clean: {stats['docs_read']:,} documents read, {stats['docs_out']:,} kept")
    table.add_column("step")
    table.add_column("docs in", justify="right")
    table.add_column("removed", justify="right")
    table.add_column("%", justify="right")
    table.add_column("chars out", justify="right")
    table.add_column("top reasons", overflow="fold")
    for name, step in stats["steps"].items():
        share = 100 * step["docs_removed"] / step["docs_in"] if step["docs_in"] else 0.0
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(step["reasons"].items(), key=lambda kv: -kv[1])[:3])
        lines = step.get("lines_removed", {})
        if lines:  # lines taken out of documents that were kept
            top = ", ".join(f"{r} {n:,}" for r, n in sorted(lines.items(), key=lambda kv: -kv[1])[:3])
            reasons += f"{'; ' if reasons else ''}{sum(lines.values()):,} lines: {top}"
        table.add_row(name, f"{step['docs_in']:,}", f"{step['docs_removed']:,}", f"{share:.1f}",
                      f"{step['chars_out']:,}", reasons)
    if stats["reader_issues"]:
        issues = ", ".join(f"{k} {v:,}" for k, v in stats["reader_issues"].items())
        table.caption = f"not read: {issues}"
    return table
