"""The compression verbs of `lmforge`: quantize, prune, distill, compare.

Thin: parse, call `lmforge.compress`, print. `lmforge.cli`'s table lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lmforge.console_text import console


def quantize(
    model: Annotated[Path, typer.Argument(help="An fp32 model directory.")],
    method: Annotated[str, typer.Option(help="int8 (per channel) | int4 (groups, round-to-nearest) | "
                                             "gptq (int4, calibrated) | w8a8 (int8 weights and activations).")],
    out: Annotated[Path, typer.Option(help="Where the quantized model directory goes.")],
    group_size: Annotated[Optional[int], typer.Option(help="int4/gptq: inputs per scale, a multiple of 32 "
                                                      "(default: 128, or the largest of 64/32 that fits the model).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="gptq: calibration data, a prepared data directory or a text file.")] = None,
    samples: Annotated[int, typer.Option(help="gptq: calibration sequences.")] = 256,
    seq_len: Annotated[Optional[int], typer.Option(help="gptq: tokens per calibration sequence (default min(512, context)).")] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="compressed-tensors (int8/int4/gptq: Hugging Face names, read by transformers, vLLM and "
                         "lmforge) | lmforge (lmforge's own layout; other loaders refuse it). Default: "
                         "compressed-tensors where it can hold the model (not w8a8, not gpt2's Conv1D).")] = None,
):
    """Quantize a model: packed integers and scales that load back with `lmforge.load` (and, in the
    compressed-tensors layout, with transformers)."""
    from lmforge.compress.quantize import run_quantize

    r = run_quantize(model, method, out, group_size=group_size, data=data, samples=samples, seq_len=seq_len,
                     log=lambda s: console.print(f"   {s}", highlight=False), layout=format)
    groups = f", groups of {r['group_size']}" if r["group_size"] else ""
    console.print(f"[green]quantized[/] ({r['method']}{groups}, {r['layout']} layout) in {r['seconds']:.1f} s: weights {r['bytes_before'] / 1e6:.1f} MB "
                  f"-> {r['bytes_after'] / 1e6:.1f} MB ({r['bytes_before'] / max(1, r['bytes_after']):.1f}x smaller): {out}")


def prune(
    model: Annotated[Path, typer.Argument(help="An fp32 model directory.")],
    sparsity: Annotated[float, typer.Option(help="Share of the block weights set to zero, in (0, 1).")],
    out: Annotated[Path, typer.Option(help="Where the pruned model directory goes.")],
    method: Annotated[str, typer.Option(help="magnitude | wanda (needs --data).")] = "magnitude",
    pattern: Annotated[str, typer.Option(help="unstructured | 2:4.")] = "unstructured",
    data: Annotated[Optional[Path], typer.Option(help="Calibration data for wanda and --recover-steps: a prepared data directory or a text file.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 128,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per calibration sequence (default min(512, context)).")] = None,
    recover_steps: Annotated[int, typer.Option(help="Fine-tune this many steps afterwards, zeros kept (0: off).")] = 0,
):
    """Prune a model by magnitude or Wanda, unstructured or 2:4."""
    from lmforge.compress.prune import run_prune

    r = run_prune(model, out, sparsity, method, pattern, data=data, samples=samples, seq_len=seq_len,
                  recover_steps=recover_steps)
    tail = f"; recovery loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" if r["losses"] else ""
    console.print(f"[green]pruned[/] ({method}, {pattern}): {r['measured_sparsity']:.1%} of the block weights are zero"
                  f"{tail}: {out}")


def compare(
    models: Annotated[list[Path], typer.Argument(help="Model directories to compare.")],
    data: Annotated[Optional[Path], typer.Option(help="Validation data: a prepared data directory (its val split) or a text file.")] = None,
    max_batches: Annotated[int, typer.Option(help="Validation batches of 8 sequences at most.")] = 20,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per speed measurement.")] = 64,
    chart: Annotated[Optional[Path], typer.Option(help="Write a PNG bar chart here.")] = Path("compare.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
):
    """The compression report: parameters, file size, validation perplexity, batch-1 decode speed."""
    from lmforge.compress.compare import compare as run_compare

    rows = run_compare(models, data, max_batches, new_tokens, chart)
    if as_json:
        import json

        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    print_table(rows)
    if chart is not None:
        console.print(f"chart: {chart}")


def print_table(rows, out: Console = console) -> None:
    from rich.table import Table

    base = rows[0]
    table = Table(title="compression report (speed relative to the first model)")
    for col in ("model", "method", "parameters", "file MB", "size", "perplexity", "tokens/s", "speed", "J/token"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
        table.add_row(Path(r.model).name, r.method, f"{r.parameters / 1e6:.2f}M", f"{r.file_mb:.2f}",
                      f"{base.file_mb / r.file_mb:.2f}x smaller" if r is not base else "", ppl,
                      f"{r.tokens_per_s:.1f}", f"{r.tokens_per_s / base.tokens_per_s:.2f}x",
                      f"{r.joules_per_token:.3g}" if r.joules_per_token is not None else "-")
    sources = sorted({r.energy_source for r in rows if r.energy_source})
    if sources:
        table.caption = "energy: " + "; ".join(sources)
    out.print(table)


def distill(
    teacher: Annotated[Path, typer.Option(help="The teacher model directory.")],
    student: Annotated[str, typer.Option(help="A model directory to start from, or a recipe (name or YAML) for a new model.")],
    data: Annotated[Path, typer.Option(help="A prepared data directory (`lmforge data prepare`, teacher's tokenizer).")],
    out: Annotated[Path, typer.Option(help="Where the student model directory goes.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 3e-3,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the KL term; 1 - alpha weighs cross-entropy.")] = 0.9,
    top_k: Annotated[int, typer.Option(help="Keep (and cache) only the teacher's top-k logits per position (0: all).")] = 0,
    pool: Annotated[int, typer.Option(help="Distinct batches revisited in turn (0: a new batch every step).")] = 0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term: each student block imitates "
                                                 "an evenly spaced teacher block (0: logits only).")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of a new student's weights and of the batch order.")] = 0,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints (default: one at the "
                                                            "end, and one when interrupted).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="The run's directory: recipe.yaml, metrics.jsonl, "
                                                    "checkpoints (default: OUT-run beside --out).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its newest intact checkpoint (the same "
                                              "flags, --run-dir included).")] = False,
):
    """Distillation: temperature-scaled KL to the teacher's logits, cross-entropy on the data, and
    the teacher's hidden states block by block."""
    from lmforge.compress.distill import DistillConfig, run_distill
    from lmforge.config import from_flags

    cfg = from_flags(DistillConfig, steps=steps, batch_size=batch_size, lr=lr, temperature=temperature, alpha=alpha,
                     top_k=top_k, pool=pool, hidden_weight=hidden_weight, seed=seed, checkpoint_every=checkpoint_every)
    r = run_distill(teacher, student, data, out, cfg, log=lambda s: console.print(f"   {s}", highlight=False),
                    run_dir=run_dir, resume=resume)
    console.print(f"[green]distilled[/] a {r['student_params'] / 1e6:.2f}M student from a {r['teacher_params'] / 1e6:.2f}M "
                  f"teacher in {r['seconds']:.0f} s: validation perplexity {r['val_perplexity_before']:.2f} -> "
                  f"{r['val_perplexity_after']:.2f}: {out}   (run: {r['run_dir']})")


def quickstart_report(model_dir: Path, data_dir: Path, run_dir: Path, out: Console) -> None:
    """The quickstart's compression step: int8 and int4 copies of its model, compared."""
    import lmforge
    from lmforge.compress.compare import compare as run_compare
    from lmforge.compress.quantize import fitting_group_size, run_quantize

    group = fitting_group_size(lmforge.load(model_dir).model)
    methods = ["int8"] + (["int4"] if group else [])
    out.print(f"6. compress: {' and '.join(methods)} (int4 in groups of {group}) -> compare")
    dirs = [model_dir]
    for method in methods:
        target = run_dir / f"model-{method}"
        run_quantize(model_dir, method, target, log=lambda s: None)
        dirs.append(target)
    rows = run_compare(dirs, data_dir, max_batches=8, new_tokens=64, chart=run_dir / "plots" / "compare.png")
    print_table(rows, out)
    out.print("   (a model this small is read from the CPU's cache, where fewer bytes save little time; the "
              "speed-up grows once the weights no longer fit in it: docs/compress.md)")
    out.print(f"   chart: {run_dir / 'plots' / 'compare.png'}   "
              f"(lmforge compare {' '.join(str(d) for d in dirs)} --data {data_dir})")
