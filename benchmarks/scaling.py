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

A shared machine distorts that wall-clock ratio (each process gets one scheduler share of a
busy CPU), so every rank also records the CPU time (`time.process_time`) of each training step,
and the work efficiency is

    tokens per CPU-second of all N processes together / tokens per CPU-second of 1 process

what the layout adds in computation (collectives' CPU work, duplicated work, TP's smaller
matmuls), independent of the load; time spent waiting (the bubble, blocked collectives) costs
no CPU and shows only in the wall-clock figure.

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


def worker(out: Path, argv: list[str]) -> None:
    """Run `lmforge <argv>`, recording this rank's CPU seconds per training step."""
    import json
    import time

    from lmforge.cli import main as lmforge_main
    from lmforge.train.run import Run

    take_step, seconds = Run._train_step, []

    def timed_step(self, step):  # CPU time of the step alone, not of start-up or validation
        start = time.process_time()
        result = take_step(self, step)
        seconds.append(time.process_time() - start)
        return result

    Run._train_step = timed_step
    sys.argv = ["lmforge", *argv]
    try:
        lmforge_main()
    except SystemExit as e:
        if e.code:
            raise
    (out / f"cpu-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seconds))


def cpu_seconds(out: Path, skip: int) -> float:
    """CPU seconds of the steps after `skip`, summed over the ranks."""
    import json

    return sum(sum(json.loads(f.read_text())[skip:]) for f in out.glob("cpu-*.json"))


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
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(args.worker, rest)
        return
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
    per_cpu_s: dict[str, list[float]] = {name: [] for name in configs}  # tokens per CPU-second
    for r in range(args.rounds):
        for i, (name, (nproc, parallel)) in enumerate(configs.items()):
            run_name = f"r{r}-c{i}"
            env = dict(os.environ) if on_gpu else {**os.environ, "OMP_NUM_THREADS": str(threads)}
            cpu_dir = out / f"{run_name}-cpu"
            cpu_dir.mkdir()
            me = [str(Path(__file__).resolve()), "--worker", str(cpu_dir)]
            launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={nproc}"]
            cmd = [sys.executable, *launcher, *me, "train", str(out / "recipe.yaml"), "--no-progress",
                   "--run.name", run_name, "--train.parallel", parallel]
            log = out / f"{run_name}.log"
            with open(log, "w") as f:
                code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if code:
                print(f"{name} failed (exit code {code}); its output is in {log}")
                continue
            rates[name].append(tokens_per_s(out / "runs" / run_name, args.skip))
            per_cpu_s[name].append(args.batch * args.context * (args.steps - args.skip) /
                                   cpu_seconds(cpu_dir, args.skip))

    where = f"{args.nproc} GPUs, NCCL" if on_gpu else f"CPU gloo, {threads} thread(s) per process"
    print(f"# scaling at {args.nproc} processes ({where}): llama {args.layers}x{args.d_model}, context "
          f"{args.context}, global batch {args.batch}, {args.steps} steps ({args.skip} warm-up), median of "
          f"{args.rounds} rounds")
    print(f"# {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared)")
    if not rates["1 process"]:
        sys.exit("the one-process baseline failed")
    base = statistics.median(rates["1 process"])
    base_cpu = statistics.median(per_cpu_s["1 process"])
    print(f"{'layout':12} {'tokens/s':>10} {'per process':>12} {'efficiency':>11} {'tok/CPU-s':>10} "
          f"{'work eff.':>9}   runs")
    for name, values in rates.items():
        if not values:
            print(f"{name:12} failed")
            continue
        n = configs[name][0]
        v = statistics.median(values)
        c = statistics.median(per_cpu_s[name])
        print(f"{name:12} {v:>10,.0f} {v / n:>12,.0f} {v / (n * base):>11.0%} {c:>10,.0f} {c / base_cpu:>9.0%}   "
              + ", ".join(f"{x:,.0f}" for x in values))


if __name__ == "__main__":
    main()
