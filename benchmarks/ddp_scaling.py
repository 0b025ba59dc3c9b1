"""Data-parallel scaling: training tokens/s of 1 process against N, on one global batch.

Every configuration runs the real command, `lmforge train RECIPE --nproc N` (torchrun:
gloo on CPU, NCCL on GPUs), with the same recipe and so the same global batch
(`train.batch_size` is split over the processes). tokens/s comes from the run's
metrics.jsonl, after the first `--skip` steps (warm-up).

On CPU (N processes share the machine's cores):
    1 process x 1 thread        the one-worker baseline
    1 process x T threads       every core in one process (T = --threads, default all cores)
    N processes x T/N threads   data parallel over the same cores
    scaling efficiency = tokens/s(N processes) / (N x tokens/s(1 process x 1 thread))
On GPUs (one per process): 1 GPU against N GPUs, efficiency = tokens/s(N) / (N x tokens/s(1)).
Configurations alternate for --rounds rounds and the median of each is reported, because a
shared machine's speed drifts.

    python benchmarks/ddp_scaling.py                          # CPU, 2 processes
    python benchmarks/ddp_scaling.py --parallel fsdp
    python benchmarks/ddp_scaling.py --nproc 8 --layers 12 --d-model 768 --context 1024 --batch 64   # 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import machine

from lmforge.config import load_recipe
from lmforge.data.prepare import prepare
from lmforge.train.metrics import read_metrics


def tokens_per_s(run_dir: Path, skip: int) -> float:
    """Tokens over seconds between the first logged step after `skip` and the last."""
    logged = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    start = next(r for r in logged if r["step"] >= skip)
    end = logged[-1]
    return (end["tokens"] - start["tokens"]) / (end["elapsed_s"] - start["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU cores to use in all")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    on_gpu = gpus > 0
    if args.batch % args.nproc:
        sys.exit(f"--batch {args.batch} must be divisible by --nproc {args.nproc}")
    out = args.out or Path(tempfile.mkdtemp(prefix="lmforge-ddp-bench-"))
    recipe = load_recipe(None, {
        "model": {"family": "llama", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
                  "context": args.context},
        "data": {"corpus": "synthetic", "dir": str(out / "data"), "tokenizer": {"vocab_size": 2048}},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "warmup": 5, "log_every": 5,
                  "checkpoint_every": 10**6, "parallel": args.parallel, "seed": 0},
        "eval": {"every": 10**6, "batches": 1},
        "run": {"name": "bench", "out": str(out / "runs")},
    })
    prepare(recipe.data, recipe.data.dir)
    (out / "recipe.yaml").write_text(recipe.to_yaml())

    if on_gpu:
        n = min(args.nproc, gpus)
        configs = {"1 GPU": (1, None)}
        if n > 1:
            configs[f"{n} GPUs ({args.parallel})"] = (n, None)
    else:
        n = args.nproc
        per = max(1, args.threads // n)
        configs = {"1 process x 1 thread": (1, 1), f"1 process x {args.threads} threads": (1, args.threads),
                   f"{n} processes x {per} thread{'s' if per > 1 else ''} ({args.parallel})": (n, per)}

    rates: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for i, (name, (nproc, threads)) in enumerate(configs.items()):
            run_name = f"r{r}-c{i}"
            env = dict(os.environ)
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
            cmd = [sys.executable, "-m", "lmforge", "train", str(out / "recipe.yaml"), "--nproc", str(nproc),
                   "--no-progress", "--run.name", run_name]
            log = out / f"{run_name}.log"
            with open(log, "w") as f:
                code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if code:
                sys.exit(f"{name} failed (exit code {code}); its output (every rank's) is in {log}")
            rates[name].append(tokens_per_s(out / "runs" / run_name, args.skip))

    print(f"# data-parallel scaling, {'NCCL' if on_gpu else 'gloo'}, {args.parallel}: llama {args.layers}x{args.d_model}, "
          f"context {args.context}, global batch {args.batch}, {args.steps} steps ({args.skip} warm-up), "
          f"median of {args.rounds} rounds")
    print(f"# {machine()}" + (f", {gpus} x {torch.cuda.get_device_name(0)}" if on_gpu else ""))
    print("# the machine may be shared with other work: figures vary between runs")
    median = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in median.items():
        runs = ", ".join(f"{x:,.0f}" for x in rates[name])
        print(f"{name:40} {v:>10,.0f} tokens/s   (runs: {runs})")
    names = list(median)
    if len(names) > 1:
        base = median[names[0]]
        parallel = median[names[-1]]
        print(f"speed-up of {names[-1]} over {names[0]}: {parallel / base:.2f}x; "
              f"scaling efficiency {parallel / (n * base):.0%}")
        if not on_gpu:
            print(f"against {names[1]} (the same cores in one process): {parallel / median[names[1]]:.2f}x")
    else:
        print(f"one GPU only: a {args.nproc}-GPU comparison needs {args.nproc} GPUs")


if __name__ == "__main__":
    main()
