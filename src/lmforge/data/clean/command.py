"""`lmforge data clean INPUTS… --out DIR [--recipe clean.yaml]`: the CLI verb of the refinery."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmforge.console_text import console


def clean_command(
    inputs: Annotated[list[str], typer.Argument(help="Text/JSONL(.gz/.zst)/Parquet files, directories or globs.")],
    out: Annotated[str, typer.Option(help="Output directory: part-*.jsonl, stats.json, plots/.")],
    recipe: Annotated[Optional[str], typer.Option(help="A cleaning recipe YAML (unset keys keep their defaults), or a preset: books.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (0: one per CPU core).")] = 0,
    text_field: Annotated[Optional[str], typer.Option(help="Field holding the text in JSONL/Parquet (overrides the recipe).")] = None,
    languages: Annotated[Optional[str], typer.Option(help="Keep only these languages, e.g. 'en,zh' (overrides the recipe).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Discard a previous run in OUT instead of resuming it.")] = False,
    engine: Annotated[str, typer.Option(help="'local' processes, or 'dask' (needs dask[distributed]).")] = "local",
    scheduler: Annotated[Optional[str], typer.Option(help="Dask scheduler address (engine dask); unset: a local cluster.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> dict:
    """Clean, filter, deduplicate and profile a corpus; re-running resumes an interrupted run."""
    from lmforge.data.clean.pipeline import clean
    from lmforge.data.clean.recipe import load_recipe
    from lmforge.data.clean.report import summary_table

    overrides = {}
    if text_field is not None:
        overrides["reader"] = {"text_field": text_field}
    if languages is not None:
        overrides["langid"] = {"languages": languages}
    cleaning = load_recipe(recipe, **overrides)
    bar = Progress(TextColumn("cleaning shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress)
    task = bar.add_task("clean", total=None)
    try:
        with bar:
            stats = clean(inputs, out, cleaning, workers=workers or os.cpu_count() or 1, overwrite=overwrite,
                          on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                          engine=engine, scheduler=scheduler)
    except KeyboardInterrupt:
        console.print("[yellow]finished shards are kept: run the same command again to resume[/]")
        raise
    console.print(summary_table(stats))
    console.print(f"{out}: {len(stats['outputs'])} part files, {stats['docs_out']:,} documents, "
                  f"{stats['chars_out']:,} characters; report: {os.path.join(out, 'stats.json')}")
    return stats
