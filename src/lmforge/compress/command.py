"""The compression verbs of `lmforge`: quantize, prune, distill, compare.

Thin: parse, call `lmforge.compress`, print. `register(app)` adds them to the main CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()


def quantize(
    model: Annotated[Path, typer.Argument(help="An fp32 model directory.")],
    method: Annotated[str, typer.Option(help="int8 (per channel) | int4 (groups, round-to-nearest) | "
                                             "gptq (int4, calibrated) | w8a8 (int8 weights and activations).")],
    out: Annotated[Path, typer.Option(help="Where the quantized model directory goes.")],
    group_size: Annotated[int, typer.Option(help="int4/gptq: inputs per scale (a multiple of 32).")] = 128,
    data: Annotated[Optional[Path], typer.Option(help="gptq: calibration data, a prepared data directory or a text file.")] = None,
    samples: Annotated[int, typer.Option(help="gptq: calibration sequences.")] = 256,
    seq_len: Annotated[Optional[int], typer.Option(help="gptq: tokens per calibration sequence (default min(512, context)).")] = None,
):
    """Quantize a model: packed integers and scales that load back with `lmforge.load`."""
    from lmforge.compress.quantize import run_quantize

    r = run_quantize(model, method, out, group_size=group_size, data=data, samples=samples, seq_len=seq_len,
                     log=lambda s: console.print(f"   {s}", highlight=False))
    console.print(f"[green]quantized[/] ({r['method']}) in {r['seconds']:.1f} s: weights {r['bytes_before'] / 1e6:.1f} MB "
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


def register(app: typer.Typer) -> None:
    for command in (quantize, prune):
        app.command()(command)
