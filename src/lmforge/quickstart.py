"""`lmforge quickstart`: the whole life of a small model in a few minutes on a CPU.

corpus -> clean -> tokenizer -> shards -> pretrain (sized to the time budget) -> validation
perplexity beside a unigram baseline -> samples -> model directory saved and reloaded.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import load_recipe
from lmforge.console_text import print_model_text
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import data_dir_for, prepare
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import unigram_baseline
from lmforge.model import Transformer
from lmforge.train.losses import language_model_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import autocast_for
from lmforge.train.trainer import train

PROMPTS = ["ROMEO:\n", "To be, or not", "The king"]  # the built-in Shakespeare's; other corpora give their own


def corpus_name(corpus: str) -> str:
    """A folder name for a user's corpus: its directory and file stem without glob characters
    (`my/*.txt` -> `my`, `data/zh_*.jsonl` -> `data-zh`, `文章.jsonl` -> `文章`), anything but
    letters (of any script), digits, '.', '-' and '_' turned into '-'."""
    path = Path(corpus.rstrip("/"))
    parts = path.parts
    first_glob = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if first_glob is None:
        pieces = [path.name if path.is_dir() else path.stem]
    else:
        directory = parts[first_glob - 1] if first_glob else ""
        pattern = re.sub(r"[*?\[\]]", "", Path(parts[-1]).stem)
        pieces = [directory, pattern]
    cleaned = [re.sub(r"[^\w.-]+", "-", piece).strip("-._") for piece in pieces]
    return "-".join(piece for piece in cleaned if piece) or "corpus"


def opening_words(text: str, words: int = 4, max_chars: int = 24, cjk_chars: int = 8) -> str:
    """The start of a text's first line as a prompt: a few words, or for a script written
    without spaces (Chinese, Japanese) its first characters."""
    line = next((line.strip() for line in text.replace("\ufffd", "").splitlines() if line.strip()), "")
    prompt = ""
    for word in line.split()[:words]:
        longer = f"{prompt} {word}".strip()
        if len(longer) > max_chars:
            break
        prompt = longer
    return prompt if prompt and " " in line else line[:cjk_chars]


def corpus_prompts(data_dir: Path, tokenizer, count: int = 3) -> list[str]:
    """Sample prompts from the corpus itself: the opening words of `count` held-out (validation)
    documents, spread over the split, so the model is shown text it did not train on."""
    from lmforge.data.prepare import read_index

    eos = read_index(data_dir)["eos_id"]
    tokens = np.asarray(TokenSplit(data_dir, "val").shards[0])
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    prompts: list[str] = []
    for k in sorted({round(x) for x in np.linspace(0, len(ends) - 1, count * 3)}):  # spare ones for repeats
        prompt = opening_words(tokenizer.decode(tokens[starts[k]:min(ends[k], starts[k] + 48)].tolist()))
        if prompt and prompt not in prompts:
            prompts.append(prompt)
    if len(prompts) > count:
        prompts = [prompts[round(i)] for i in np.linspace(0, len(prompts) - 1, count)]
    return prompts or PROMPTS


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
    """The corpus after `lmforge data clean --recipe books` (normalization, page furniture, PII,
    dedup; not the web-page quality filters, which judge crawled pages, not the text a user
    chose to train on), printed as that command; the generated `synthetic` corpus is used as it is."""
    if corpus == "synthetic":
        return corpus
    from lmforge.data.clean.pipeline import clean
    from lmforge.data.clean.recipe import load_recipe as load_clean_recipe
    from lmforge.data.corpora import shakespeare_dir

    source = str(shakespeare_dir()) if corpus == "shakespeare" else corpus
    target = out / "clean" / ("shakespeare" if corpus == "shakespeare" else corpus_name(corpus))
    stats = clean([source], target, load_clean_recipe("books"), workers=1)
    console.print(f"   cleaned: {stats['docs_out']} of {stats['docs_read']} documents kept -> {target} "
                  f"(report: {target / 'stats.json'})")
    console.print(f"   the same as: lmforge data clean {shlex.quote(source)} --out {shlex.quote(str(target))} --recipe books "
                  "(without --recipe, data clean also applies the web-page quality filters: docs/data.md)")
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
    prompts = PROMPTS if corpus == "shakespeare" else corpus_prompts(data_dir, loaded.tokenizer)
    console.print("4. samples (temperature 0.8, top-k 50, seed 0"
                  + ("" if corpus == "shakespeare" else "; prompts: the openings of held-out documents") + "):",
                  soft_wrap=True)
    for prompt, text in zip(prompts, loaded.generate(prompts, max_new_tokens=48, temperature=0.8, top_k=50, seed=0)):
        print_model_text(console, "   ", (repr(prompt), "bold"), " -> ", repr(text))

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
    hint = prompts[0].strip()  # a prompt of this corpus, quoted for the shell
    other_corpus = "" if corpus == "shakespeare" else f" --data.corpus {shlex.quote(str(recipe.data.corpus))}"
    name = Path(result.model_dir).resolve().name  # the name `lmforge serve` gives the model
    request = json.dumps({"model": name, "prompt": hint, "max_tokens": 32}, ensure_ascii=False)
    console.print("Next:")
    for line in (f"lmforge generate {result.model_dir} --prompt {shlex.quote(hint)} --temperature 0.8 --top-k 50",
                 f"lmforge chat {result.model_dir}",
                 f"lmforge eval {result.model_dir} --data {data_dir}",
                 f"lmforge train quickstart{other_corpus} --train.max_steps 3000 --run.name longer   (a longer run)",
                 f"lmforge serve {result.model_dir}   (OpenAI-compatible API; chat page at http://127.0.0.1:8000/)",
                 "curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
                 f"-d {shlex.quote(request)}"):
        console.print(f"   {line}", highlight=False, markup=False, soft_wrap=True)

    from lmforge.interop.convert import export_for_runtimes

    console.print("Exported for other runtimes (see docs/interop.md):")
    for line in export_for_runtimes(result.model_dir, recipe.run.dir / "export", hint):
        console.print(f"   {line}", highlight=False, markup=False, soft_wrap=True)
    return result.model_dir
