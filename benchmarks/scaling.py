"""Scaling efficiency of each parallel layout at N processes: training tokens/s per process
against one process, on one global batch, CPU gloo (or GPUs with NCCL, one per process).

Every configuration is the real command, `lmforge train RECIPE --nproc N --train.parallel L`,
on the same recipe and so the same global batch; tokens/s comes from the run's metrics.jsonl
after the first `--skip` steps (`ddp_scaling.tokens_per_s`). On CPU every process gets
cores / N threads (OMP_NUM_THREADS), and the baseline is one process with as many threads as
one of them, so that

    scaling efficiency = tokens/s(N processes) / (N x tokens/s(1 process))

is what carries over to one process per device: 100% is linear scaling; what is lost is the
collectives (DDP's all-reduce, FSDP's all-gathers and reduce-scatters, TP's all-reduces per
block), the pipeline bubble and idle stages, and, on a shared machine, the other work.
Configurations alternate for --rounds rounds and medians are reported.

    python benchmarks/scaling.py                                 # ddp, fsdp, tp, pp at 2 processes
    python benchmarks/scaling.py --layouts ddp,fsdp --nproc 4 --layers 12 --d-model 768   # GPUs
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
from ddp_scaling import tokens_per_s

from lmforge.config import load_recipe
from lmforge.data.prepare import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="ddp,fsdp,tp,pp", help="comma-separated train.parallel values")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores shared by the processes")
    args = ap.parse_args()
    on_gpu = torch.cuda.device_count() >= args.nproc
    out = Path(tempfile.mkdtemp(prefix="lmforge-scaling-"))
    recipe = load_recipe(None, {
        "model": {"family": "llama", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
                  "context": args.context},
        "data": {"corpus": "synthetic", "dir": str(out / "data"), "tokenizer": {"vocab_size": 2048}},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "warmup": 5, "log_every": 5,
                  "checkpoint_every": 10**6, "seed": 0},
        "eval": {"every": 10**6, "batches": 1},
        "run": {"name": "bench", "out": str(out / "runs")},
    })
    prepare(recipe.data, recipe.data.dir)
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    threads = max(1, args.cores // args.nproc)
    configs = {"1 process": (1, "auto")} | {layout: (args.nproc, layout) for layout in args.layouts.split(",")}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for i, (name, (nproc, parallel)) in enumerate(configs.items()):
            run_name = f"r{r}-c{i}"
            env = dict(os.environ) if on_gpu else {**os.environ, "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "lmforge", "train", str(out / "recipe.yaml"), "--nproc", str(nproc),
                   "--no-progress", "--run.name", run_name, "--train.parallel", parallel]
            log = out / f"{run_name}.log"
            with open(log, "w") as f:
                code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if code:
                print(f"{name} failed (exit code {code}); its output is in {log}")
                continue
            rates[name].append(tokens_per_s(out / "runs" / run_name, args.skip))

    where = f"{args.nproc} GPUs, NCCL" if on_gpu else f"CPU gloo, {threads} thread(s) per process"
    print(f"# scaling at {args.nproc} processes ({where}): llama {args.layers}x{args.d_model}, context "
          f"{args.context}, global batch {args.batch}, {args.steps} steps ({args.skip} warm-up), median of "
          f"{args.rounds} rounds")
    print(f"# {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared)")
    if not rates["1 process"]:
        sys.exit("the one-process baseline failed")
    base = statistics.median(rates["1 process"])
    print(f"{'layout':12} {'tokens/s':>10} {'per process':>12} {'efficiency':>11}   runs")
    for name, values in rates.items():
        if not values:
            print(f"{name:12} failed")
            continue
        n = configs[name][0]
        v = statistics.median(values)
        print(f"{name:12} {v:>10,.0f} {v / n:>12,.0f} {v / (n * base):>11.0%}   "
              + ", ".join(f"{x:,.0f}" for x in values))


if __name__ == "__main__":
    main()
