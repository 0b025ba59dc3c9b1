"""Hyperparameter search under one CPU-time budget, with and without pruning.

Two `lmforge hpo` studies over the same space (learning rate, log scale, and layer count)
and the same recipe, one with the median pruner and one without, each given the same
budget of CPU minutes (`--cpu-minutes`: no trial starts after the worker has used it; the
running one finishes, so each arm overshoots by at most one trial). A CPU budget, not a
wall-clock one, because a shared machine hands out cores unevenly. Both arms run at the
same time, one process and one thread each. With one seed both draw the same first
(random) trials: the difference is what pruning frees for later trials.

    python benchmarks/hpo.py                          # 2 CPU-minutes per arm
    python benchmarks/hpo.py --cpu-minutes 0.5 --steps 40   # quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from common import machine

from lmforge.config import load_recipe
from lmforge.train.hpo import prepare_locked

SPACE = {"train.lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
         "model.n_layer": {"type": "int", "low": 1, "high": 3}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-minutes", type=float, default=2.0, help="CPU-time budget of each arm")
    ap.add_argument("--steps", type=int, default=80, help="training steps of a full trial")
    ap.add_argument("--every", type=int, default=10, help="validation (and pruning) interval in steps")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lmforge-hpo-bench-"))
    recipe = load_recipe(None, {
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "context": 64},
        "data": {"corpus": "synthetic", "tokenizer": {"vocab_size": 512}},
        "train": {"batch_size": 8, "max_steps": args.steps, "warmup": 5, "checkpoint_every": 10**6,
                  "log_every": 10, "seed": 0},
        "eval": {"every": args.every, "batches": 4},
        "run": {"name": "bench", "out": str(out / "runs")},
    })
    recipe.data.dir = str(prepare_locked(recipe))  # once, before the arms start
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    (out / "space.yaml").write_text(yaml.safe_dump(SPACE))
    storage = f"sqlite:///{out / 'hpo.db'}"

    lmforge = str(Path(sys.executable).with_name("lmforge"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arms = {}
    for name, pruner in (("median pruner", "median"), ("no pruning", "none")):
        cmd = [lmforge, "hpo", str(out / "recipe.yaml"), "--space", str(out / "space.yaml"), "--trials", "10000",
               "--cpu-minutes", str(args.cpu_minutes), "--storage", storage, "--study", pruner, "--pruner", pruner,
               "--seed", "0"]
        log = open(out / f"{pruner}.log", "w")
        arms[name] = (pruner, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    usage = {}
    for name, (_, proc) in arms.items():
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            sys.exit(f"{name} failed; see {out / (arms[name][0] + '.log')}")
        usage[name] = (rusage.ru_utime + rusage.ru_stime) / 60

    print(f"# hyperparameter search, {args.cpu_minutes:g} CPU-minutes per arm, both arms at once on one thread each")
    print(f"# {machine()}")
    print("# the machine is shared with other work: figures vary between runs")
    print(f"# recipe: llama 2x64 (searching n_layer 1-3, lr 1e-5..1 log), {args.steps} steps a trial, "
          f"validation every {args.every}; runs in {out}")
    rows = {}
    for name, (pruner, _) in arms.items():
        study = optuna.load_study(study_name=pruner, storage=storage)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
        steps = sum(args.steps if t.state == TrialState.COMPLETE else max(t.intermediate_values, default=0)
                    for t in complete + pruned)
        best = min((t.value for t in complete), default=float("nan"))
        ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
        wall = (max(ends) - min(t.datetime_start for t in study.trials)).total_seconds() if ends else 0.0
        rows[name] = {"trials finished": len(complete) + len(pruned), "complete": len(complete),
                      "pruned": len(pruned), "training steps run": steps,
                      "best validation loss": f"{best:.4f}",
                      "best lr": f"{study.best_params['train.lr']:.3g}" if complete else "-",
                      "CPU minutes": f"{usage[name]:.2f}", "wall minutes": f"{wall / 60:.2f}"}
    names = list(rows)
    print(f"{'':24}" + "".join(f"{n:>16}" for n in names))
    for key in rows[names[0]]:
        print(f"{key:24}" + "".join(f"{str(rows[n][key]):>16}" for n in names))
    a, b = (rows[n]["trials finished"] for n in names)
    print(f"trials finished with pruning / without: {a / max(b, 1):.2f}x")


if __name__ == "__main__":
    main()
