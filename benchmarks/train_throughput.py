"""Training tokens/s: lmforge's model and loop against `transformers` GPT2LMHeadModel.

Same configuration (GPT-2 family, 6 layers x 384, vocab 8192 by default), same batches
from the same prepared shards, same AdamW settings, gradient clipping on both, the same
precision: fp32 by default (the target's terms), or `--dtype bfloat16` for bf16 autocast
on both (what `train.dtype: auto` picks on a CPU with AVX512-BF16 or AMX).
Ours runs through the real trainer (`lmforge.train.trainer.train`), whose metrics.jsonl
gives tokens/s; theirs through an equivalent plain PyTorch loop.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --layers 2 --d-model 128 --steps 10   # quick
    python benchmarks/train_throughput.py --emulate-avx2 /work/llama_avx2/lib   # as on an AVX2-only CPU (fp32 only)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_emulation_option, emulate_avx2, emulation_report, machine, refuse

from lmforge.config import load_recipe
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import prepare
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train


def recipe_for(args, out: Path, name: str, steps: int | None = None):
    return load_recipe(None, {
        "model": {"family": "gpt2", "n_layer": args.layers, "n_head": args.heads, "d_model": args.d_model,
                  "context": args.seq, "vocab_size": args.vocab},
        "data": {"corpus": "synthetic", "dir": str(out / "data"), "tokenizer": {"vocab_size": 512}},
        "train": {"batch_size": args.batch, "max_steps": steps or args.steps + args.warmup_steps, "warmup": 5,
                  "log_every": 1, "checkpoint_every": 10**6, "compile": args.compile, "seed": 0,
                  "loss_chunk": args.loss_chunk, "dtype": args.dtype},
        "eval": {"every": 10**6, "batches": 1},
        "run": {"name": name, "out": str(out)},
    })


def ours_rate(args, out: Path, i: int) -> float:
    recipe = recipe_for(args, out, f"ours-{i}")
    result = train(recipe, progress=False, log=lambda *_: None)
    steps = [r for r in read_metrics(result.run_dir) if "tokens_per_s" in r][args.warmup_steps:]
    return statistics.median(r["tokens_per_s"] for r in steps)


def ours_cpu_rate(args, out: Path, i: int) -> float:
    """Tokens per CPU second of the trainer's steps: the process CPU time of a run of warmup + timed
    steps less that of a run of the warmup steps alone (setup, the final evaluation and saving cancel)."""
    cpu = []
    for steps in (args.warmup_steps, args.warmup_steps + args.steps):
        start = time.process_time()
        train(recipe_for(args, out, f"ours-{i}-{steps}", steps), progress=False, log=lambda *_: None)
        cpu.append(time.process_time() - start)
    return args.steps * args.batch * args.seq / (cpu[1] - cpu[0])


def theirs_rate(args, out: Path) -> float:
    import transformers

    recipe = recipe_for(args, out, "theirs")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    opt = build_optimizer(model, recipe.train, torch.device("cpu"))
    loader = BatchLoader(TokenSplit(out / "data", "train"), args.batch, args.seq, 0)
    rates, cpu = [], 0.0
    for step in range(args.steps + args.warmup_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.train)
        t, c = time.perf_counter(), time.process_time()
        x, y = loader.batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(x.numel() / (time.perf_counter() - t))
        cpu += (time.process_time() - c) if step >= args.warmup_steps else 0.0
    if args.cpu_time:
        return args.steps * args.batch * args.seq / cpu
    return statistics.median(rates[args.warmup_steps:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per round")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (train.compile)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="our train.loss_chunk (0: logits in one piece)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="precision of both: fp32, or bf16 autocast")
    ap.add_argument("--threads", type=int, help="PyTorch's CPU threads for both (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="tokens per process CPU second of the timed steps instead of per wall second (needs "
                         "--threads 1): for a shared, loaded machine")
    add_emulation_option(ap)
    args = ap.parse_args()
    if args.emulate_avx2 and args.dtype == "bfloat16":
        refuse("--emulate-avx2 runs fp32 only: an AVX2-only CPU has no bf16 instructions (drop --dtype bfloat16)")
    emulate_avx2(args.emulate_avx2)
    if args.emulate_avx2:
        print(emulation_report(), flush=True)
    if args.cpu_time and args.threads != 1:
        refuse("--cpu-time needs --threads 1 (a second thread's spinning would count as work)")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare(recipe_for(args, out, "data").data, out / "data")
        ours, theirs = [], []
        for i in range(args.rounds):  # alternate, so drift hits both alike
            ours.append((ours_cpu_rate if args.cpu_time else ours_rate)(args, out, i))
            theirs.append(theirs_rate(args, out))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {machine()}; load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"model: gpt2 family, {args.layers} layers x {args.d_model}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq}, AdamW, "
          f"{'fp32' if args.dtype == 'float32' else 'bf16 autocast'}{', compiled' if args.compile else ''}; "
          f"our loss chunk {args.loss_chunk or 'off'}"
          + ("; tokens per CPU second (ours: CPU time of a run less that of its warmup alone)" if args.cpu_time else ""))
    print(f"      lmforge: {o:8.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in ours)})")
    print(f" transformers: {t:8.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in theirs)})")
    print(f"ratio lmforge / transformers: {o / t:.2f}x  (target >= 1.2x)")


if __name__ == "__main__":
    main()
