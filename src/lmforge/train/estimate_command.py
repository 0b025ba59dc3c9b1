"""`lmforge estimate RECIPE`: the report of `lmforge.train.estimate` as tables, or as JSON
(listed in `lmforge.cli`'s table)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from lmforge.console_text import console


def estimate(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A recipe YAML file or a built-in name; extra --section.key value "
                                               "flags override it, as with `lmforge train`.")],
    nproc: Annotated[int, typer.Option(help="Processes (ranks) to estimate each layout at.")] = 1,
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory one rank may use, e.g. 8GiB or 80GB "
                                                              "(default: the GPU's, or RAM / nproc).")] = None,
    layouts: Annotated[str, typer.Option(help="Comma-separated: ddp, fsdp, tp, fsdp+tp, pp, fsdp+pp.")]
    = "ddp,fsdp,tp,fsdp+tp,pp,fsdp+pp",
    probe_steps: Annotated[int, typer.Option(help="Training steps of the measured tokens/s probe "
                                                  "(one more is run as warm-up).")] = 3,
    probe: Annotated[bool, typer.Option(help="Measure tokens/s with a few real steps (--no-probe: memory only).")]
    = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Parameters, memory per rank for each parallel layout (weights, gradients, optimizer,
    activations with and without checkpointing), tokens/s from a short probe, and the largest
    batch that fits a memory budget."""
    from lmforge.config import load_recipe
    from lmforge.train.estimate import estimate_recipe, parse_bytes

    cfg = load_recipe(recipe, list(ctx.args))
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    report = estimate_recipe(cfg, nproc, [x.strip() for x in layouts.split(",") if x.strip()], budget,
                             probe_steps if probe else 0)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from lmforge.train.estimate import gib

    p = report["parameters"]
    console.print(f"[bold]{report['recipe']['model']['family']}[/] model, vocabulary {report['vocab']:,} "
                  f"({report['vocab_from']}); {report['device']}, {report['dtype']}; "
                  f"batch {report['recipe']['batch_size']} x {report['recipe']['context']} tokens, "
                  f"grad_accum {report['recipe']['grad_accum']}", highlight=False)
    params = Table(title="parameters")
    for col in ("total", "embedding", f"per block (x{p['blocks']})", "final norm + untied head", "active per token"):
        params.add_column(col, justify="right")
    params.add_row(*(f"{p[k]:,}" for k in ("total", "embedding", "per_block", "final", "active_per_token")))
    console.print(params)

    # layouts that cannot run at this process count are said below the table, not squeezed into it
    rows = [row for row in report["layouts"] if row["valid"]]
    table = Table(title=f"memory per rank at {report['nproc']} process{'es' if report['nproc'] > 1 else ''}, "
                        f"budget {gib(report['memory_budget'])}")
    table.add_column("", no_wrap=True)
    for row in rows:
        table.add_column(row["layout"] + ("" if row["wired"] else "\n(not wired yet)"), justify="right")
    lines: dict[str, list[str]] = {}

    def cell(name: str, row: dict, text: str) -> None:
        lines.setdefault(name, [""] * len(rows))[rows.index(row)] = text

    for row in rows:
        s, m, c, sug = row["sizes"], row["memory"], row["memory_checkpointed"], row["suggestion"]
        sizes = " ".join(f"{k} {s[k]}" for k in ("dp", "tp", "pp") if s[k] > 1 or k == "dp")
        cell("layout", row, sizes + (f" m {s['microbatches']}" if s["pp"] > 1 else "")
             + (f" [yellow]({row['note']})[/]" if row["note"] else ""))
        cell("rows/microbatch", row, f"{row['rows_per_rank']:g}")
        for name, key in (("weights", "weights"), ("gradients", "gradients"), ("AdamW", "optimizer"),
                          ("extra", "extra"), ("activations", "activations"), ("total", "total")):
            cell(name, row, gib(m[key]))
        cell("ckpt: activations", row, gib(c["activations"]))
        cell("ckpt: total", row, gib(c["total"]))
        cell("tokens/s", row, f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-")
        if sug["batch_size"]:
            ckpt = " ckpt" if sug["activation_checkpointing"] and not report["recipe"]["activation_checkpointing"] else ""
            cell("batch x accum", row, f"{sug['batch_size']} x {sug['grad_accum']}{ckpt}")
            cell("largest batch", row, count(sug["largest_batch_size"]))
        else:
            cell("batch x accum", row, "[red]nothing fits[/]")
    for name, cells in lines.items():
        table.add_row(name, *cells)
    console.print(table)
    for row in report["layouts"]:
        if not row["valid"]:
            console.print(f"{row['layout']}: {row['reason']}", highlight=False)
    console.print("ckpt: with train.activation_checkpointing. batch x accum: the largest train.batch_size (and "
                  "train.grad_accum for the recipe's rows per optimizer step) that fits the budget.", highlight=False)
    probe = report["probe"]
    if probe:
        console.print(f"probe: {probe['tokens_per_s']:,.0f} tokens/s on 1 process ({probe['device']}, "
                      f"{probe['threads']} threads, {probe['steps']} steps of {probe['seconds_per_step']:.3f} s); "
                      f"at N processes: {report['tokens_per_s_assumption']}", highlight=False)


def count(n: int) -> str:
    """1,234 or 12.3k or 4.5M: short enough for a narrow column."""
    return f"{n:,}" if n < 10**5 else f"{n / 1e3:.0f}k" if n < 10**7 else f"{n / 1e6:.0f}M"
