"""`lmforge quickstart`: the whole life of a small model in a few minutes on a CPU.

corpus -> clean -> tokenizer -> shards -> pretrain (sized to the time budget) -> validation
perplexity beside a unigram baseline -> samples -> model directory saved and reloaded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import load_recipe
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import prepare
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import unigram_baseline
from lmforge.model import Transformer
from lmforge.train.losses import language_model_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import autocast_for, data_dir_for, train

PROMPTS = ["ROMEO:\n", "To be, or not", "The king"]


def seconds_per_step(recipe, data_dir: Path) -> float:
    """Time a few optimizer steps of the recipe's model on this machine, as the trainer takes
    them (its loss, its precision)."""
    torch.manual_seed(0)
    model = Transformer(recipe.model)
    device = torch.device("cpu")
    opt = build_optimizer(model, recipe.train, device)
    loader = BatchLoader(TokenSplit(data_dir, "train"), recipe.train.batch_size, recipe.model.context, 0)
    times = []
    for i in range(5):
        start = time.perf_counter()
        x, y = loader.batch(i)
        with autocast_for(device, recipe.train.dtype):
            loss = language_model_loss(model, model.lm_head, x, y, recipe.train.loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[1]  # the median after two warm-up steps (bf16 kernels are built on first use)


def clean_corpus(corpus: str, out: Path, console: Console) -> str:
    """The corpus after `lmforge data clean` (the `books` preset: normalization, PII, dedup,
    no web-page filters); the generated `synthetic` corpus is used as it is."""
    if corpus == "synthetic":
        return corpus
    from lmforge.data.clean.pipeline import clean
    from lmforge.data.clean.recipe import load_recipe as load_clean_recipe
    from lmforge.data.corpora import shakespeare_dir

    source = str(shakespeare_dir()) if corpus == "shakespeare" else corpus
    target = out / "clean" / Path(corpus.rstrip("/")).name.replace("*", "_")
    stats = clean([source], target, load_clean_recipe("books"), workers=1)
    console.print(f"   cleaned: {stats['docs_out']} of {stats['docs_read']} documents kept -> {target} "
                  f"(report: {target / 'stats.json'})")
    return str(target)


def run_quickstart(minutes: float, out: Path, corpus: str, progress: bool, console: Console) -> Path:
    if minutes <= 0:
        raise LmforgeError("--minutes must be positive")
    wall = time.perf_counter()
    console.rule("[bold]lmforge quickstart")
    console.print(f"1. data: corpus [bold]{corpus}[/] -> cleaned -> byte-level BPE tokenizer -> token shards")
    recipe = load_recipe("quickstart", {"run": {"out": str(out)}, "data": {"corpus": clean_corpus(corpus, out, console)}})
    data_dir = prepare(recipe.data, data_dir_for(recipe), progress=lambda s: console.print(f"   {s}"))
    recipe.model.vocab_size = TokenSplit(data_dir, "train").vocab_size
    train_split, val_split = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
    console.print(f"   {data_dir}: {train_split.tokens:,} training and {val_split.tokens:,} validation tokens")

    step_s = seconds_per_step(recipe, data_dir)
    # Validation and checkpoints cost a little too: budget 90% of the time for steps.
    steps = max(20, int(minutes * 60 * 0.9 / step_s))
    recipe.train.max_steps = steps
    recipe.train.warmup = min(recipe.train.warmup, steps // 10)
    recipe.train.checkpoint_every = max(1, steps // 4)
    recipe.eval.every = max(1, steps // 5)
    recipe.train.max_minutes = minutes * 1.2
    params = Transformer(recipe.model).num_params()
    console.print(f"2. pretrain: {recipe.model.family} model, {params / 1e6:.1f}M parameters, "
                  f"{steps} steps of {recipe.train.batch_size}x{recipe.model.context} tokens "
                  f"(~{step_s * 1000:.0f} ms/step here)")
    if recipe.run.dir.exists():
        console.print(f"   replacing the previous quickstart run in {recipe.run.dir}")
        shutil.rmtree(recipe.run.dir)
    result = train(recipe, progress=progress, log=lambda s: console.print(f"   {s}"))

    baseline = unigram_baseline(train_split, val_split)
    table = Table(title="3. validation")
    for col in ("model", "loss (nats/token)", "perplexity", "bits/byte"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("unigram baseline", f"{baseline.loss:.3f}", f"{baseline.perplexity:.1f}", f"{baseline.bits_per_byte:.3f}")
    v = result.val
    table.add_row("quickstart model", f"{v.loss:.3f}", f"{v.perplexity:.1f}", f"{v.bits_per_byte:.3f}")
    console.print(table)

    import lmforge

    loaded = lmforge.load(result.model_dir)
    console.print("4. samples (temperature 0.8, top-k 50, seed 0):")
    for prompt, text in zip(PROMPTS, loaded.generate(PROMPTS, max_new_tokens=48, temperature=0.8, top_k=50, seed=0)):
        console.print(f"   [bold]{prompt!r}[/] -> {text!r}", highlight=False)

    # The saved directory must reproduce the trained model exactly.
    probe = torch.from_numpy(val_split.shards[0][:64].astype("int64"))[None]
    reloaded = lmforge.load(result.model_dir).model(probe)
    diff = (reloaded - loaded.model(probe)).abs().max().item()
    console.print(f"5. model directory {result.model_dir} saved and reloaded (max logit difference {diff:.1e})")
    from lmforge.compress.command import quickstart_report

    quickstart_report(result.model_dir, data_dir, recipe.run.dir, console)

    console.rule("[bold]done")
    console.print(f"total time {time.perf_counter() - wall:.0f} s. Everything is in {recipe.run.dir}:")
    console.print(f"   model        {result.model_dir}   (loads in transformers.AutoModelForCausalLM too)")
    console.print(f"   metrics      {recipe.run.dir / 'metrics.jsonl'}")
    console.print(f"   loss plot    {recipe.run.dir / 'plots' / 'loss.png'}")
    console.print(f"   checkpoints  {recipe.run.dir / 'checkpoints'}   (recipe: {recipe.run.dir / 'recipe.yaml'})")
    console.print("Next:")
    console.print(f"   lmforge generate {result.model_dir} --prompt 'ROMEO:' --temperature 0.8 --top-k 50")
    console.print(f"   lmforge chat {result.model_dir}")
    console.print(f"   lmforge eval {result.model_dir} --data {data_dir}")
    console.print("   lmforge train quickstart --train.max_steps 3000 --run.name longer   (a longer run)")
    name = Path(result.model_dir).resolve().name  # the name `lmforge serve` gives the model
    console.print(f"   lmforge serve {result.model_dir}   (OpenAI-compatible API; chat page at http://127.0.0.1:8000/)",
                  highlight=False, markup=False, soft_wrap=True)
    console.print("   curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{name}\", \"prompt\": \"ROMEO:\", \"max_tokens\": 32}}'",
                  highlight=False, markup=False, soft_wrap=True)

    from lmforge.interop.convert import export_for_runtimes

    console.print("Exported for other runtimes (see docs/interop.md):")
    for line in export_for_runtimes(result.model_dir, recipe.run.dir / "export"):
        console.print(f"   {line}", highlight=False, markup=False, soft_wrap=True)
    return result.model_dir
