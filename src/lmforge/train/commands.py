"""`lmforge finetune` and `lmforge merge`: thin commands over `lmforge.train.finetune` and
`lmforge.model.lora` (registered onto the main app by `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()


def merge(
    base: Annotated[Path, typer.Argument(help="The base model directory the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter directory (ours or one saved by PEFT).")],
    out: Annotated[Path, typer.Option(help="The merged model directory to write.")],
    force: Annotated[bool, typer.Option(help="Merge even if the adapter records a different base model.")] = False,
):
    """Fold a LoRA adapter into its base model: a plain model directory."""
    import json

    import lmforge
    from lmforge.model.lora import ADAPTER_CONFIG, apply_adapter

    m = apply_adapter(lmforge.load(base), adapter, merge=True, check=not force)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    m.path = None
    lora = {k: config.get(k) for k in ("r", "lora_alpha", "target_modules")}
    m.save(out, parents=[str(base), str(adapter)], lora=lora)
    console.print(f"merged {adapter} into {base}: {out}")


def register(app: typer.Typer) -> None:
    app.command()(merge)
