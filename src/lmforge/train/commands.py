"""`lmforge finetune`, `lmforge merge`, `lmforge export-checkpoint` and `lmforge hpo`: thin
commands over `lmforge.train.finetune`, `lmforge.adapters`, `lmforge.train.checkpoint` and
`lmforge.train.hpo` (listed in `lmforge.cli`'s table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.console_text import console, print_line


def merge(
    base: Annotated[Path, typer.Argument(help="The base model directory the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter directory (ours or one saved by PEFT).")],
    out: Annotated[Path, typer.Option(help="The merged model directory to write.")],
    force: Annotated[bool, typer.Option(help="Merge even if the adapter records a different base model.")] = False,
):
    """Fold a LoRA adapter into its base model: a plain model directory."""
    import json

    import lmforge
    from lmforge.adapters import ADAPTER_CONFIG, apply_adapter

    m = apply_adapter(lmforge.load(base), adapter, merge=True, check=not force)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    m.path = None
    lora = {k: config.get(k) for k in ("r", "lora_alpha", "target_modules")}
    m.save(out, parents=[str(base), str(adapter)], lora=lora)
    console.print(f"merged {adapter} into {base}: {out}")


def finetune(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="The model directory to adapt, or a fine-tuning YAML "
                                                    "config (a path or a built-in recipe, e.g. lora-sft).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Training data: JSONL (sft, dpo, grpo, classify, tag, embed) or text (mlm).")] = None,
    method: Annotated[Optional[str], typer.Option(help="full | lora | qlora.")] = None,
    task: Annotated[Optional[str], typer.Option(help="sft | dpo | grpo | classify | tag | mlm | embed.")] = None,
    val: Annotated[Optional[str], typer.Option(help="Validation data (default: hold out --data.val_fraction of it).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: runs/NAME.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its newest intact checkpoint.")] = False,
    resume_from: Annotated[Optional[str], typer.Option(help="Continue from this checkpoint: step-N, or a "
                                                      "checkpoint path.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (launches torchrun).")] = 1,
):
    """Fine-tune a model: SFT, DPO, GRPO, task heads or masked-LM, in full or with LoRA/QLoRA.
    Any config key can be set: `--lora.r 16 --train.lr 2e-4 --data.pack true`."""
    import os
    import sys

    from lmforge.train.finetune import finetune as run_finetune
    from lmforge.train.finetune import load_finetune_config

    source, overrides = None, {}
    if model is not None:
        if Path(model).is_dir():
            overrides["base"] = model
        else:
            source = model
    for key, value in (("data", {"train": data, "val": val}), ("method", method), ("task", task),
                       ("run", {"name": name})):
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value:
            overrides[key] = value
    from lmforge.config import deep_merge, parse_overrides

    cfg = load_finetune_config(source, deep_merge(parse_overrides(list(ctx.args)), overrides))
    if nproc != 1 and "WORLD_SIZE" not in os.environ:
        from lmforge.train.distributed import launch, without_option

        raise typer.Exit(launch(nproc, without_option(sys.argv[1:], "--nproc")))
    result = run_finetune(cfg, resume=resume, progress=progress, log=print_line, resume_from=resume_from)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    console.print(f"[green]done[/]: {result.steps} steps in {result.seconds:.0f} s; {shown}")
    console.print(f"{'adapter' if cfg.method != 'full' else 'model'}: {result.output}   "
                  f"metrics: {result.run_dir / 'metrics.jsonl'}   plot: {result.run_dir / 'plots' / 'loss.png'}")


def export_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (runs/NAME/checkpoints/step-000500) or a run "
                                                    "directory (its latest checkpoint).")],
    out: Annotated[Path, typer.Option(help="The model directory to write.")],
):
    """Write the model of a pretraining checkpoint as a model directory (config.json, model.safetensors
    with Hugging Face names, tokenizer). Reads the sharded checkpoints of multi-process runs too, on
    one process, whatever the number of processes that wrote them."""
    from lmforge.train.checkpoint import export_checkpoint as run_export

    written = run_export(checkpoint, out, log=print_line)
    console.print(f"exported {checkpoint} to {written}")


def hpo(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A recipe YAML file or a built-in name; extra --section.key value flags override it.")],
    space: Annotated[Path, typer.Option(help="YAML mapping dotted recipe keys to distributions, e.g. `train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}`.")],
    trials: Annotated[int, typer.Option(help="Finished trials (complete or pruned) the study should have, counting earlier runs of it.")],
    storage: Annotated[Optional[str], typer.Option(help="Optuna RDB storage URL shared by all workers (default: sqlite:///<run.out>/hpo.db; postgresql://user:pass@host/db across machines).")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: <run.name>-hpo); the same name and storage continue a study.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine, each running trials.")] = 1,
    pruner: Annotated[str, typer.Option(help="Stop poor trials early on validation loss: median, hyperband or none.")] = "median",
    seed: Annotated[int, typer.Option(help="Seed of the TPE sampler.")] = 0,
    heartbeat: Annotated[int, typer.Option(help="Seconds between a running trial's heartbeats; a trial silent for twice this is failed and replaced.")] = 10,
    minutes: Annotated[Optional[float], typer.Option(help="Stop starting new trials after this many minutes (running ones finish).")] = None,
    cpu_minutes: Annotated[Optional[float], typer.Option(help="Stop starting new trials once a worker used this much CPU time (a budget that a busy machine does not shrink).")] = None,
):
    """Search hyperparameters with Optuna (TPE, pruning), over workers sharing one storage."""
    from lmforge.config import load_recipe
    from lmforge.train.hpo import run_hpo, summary_table
    from lmforge.train.hpo_space import SearchSpace

    base = load_recipe(recipe, list(ctx.args))
    result = run_hpo(base, SearchSpace.load(space, base), trials, storage, study, workers, pruner, seed,
                     heartbeat, minutes, cpu_minutes, log=lambda s: console.print(s, highlight=False, markup=False))
    console.print(summary_table(result))
    console.print(f"{result.count('COMPLETE')} complete, {result.count('PRUNED')} pruned, "
                  f"{result.count('FAIL')} failed")
    if result.best:
        console.print(f"[green]best[/]: trial {result.best['number']}, validation loss {result.best['value']:.4f}; "
                      f"recipe {result.best_recipe} (lmforge train {result.best_recipe})", highlight=False)
    else:
        console.print("[yellow]no trial completed yet[/]")
    if result.plots:
        console.print("plots: " + "  ".join(str(p) for p in result.plots), highlight=False)
