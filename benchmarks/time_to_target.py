"""Time to a validation loss: the quickstart recipe trained with AdamW and with Muon (issue 23).

1. AdamW: the quickstart recipe (its model, data, batch, schedule) for --steps steps; the
   validation bits/byte it ends at is the target (the quickstart's own result).
2. Muon (train.optimizer muon) at each --muon-lrs rate, same recipe and steps: the first
   validation at or below the target gives its steps to target.
3. Cost of a step of each, timed alternately in this process (median of rounds), in wall and in
   CPU seconds (the machine is shared: CPU time is the steadier figure).

Time to target = steps to target x seconds per step. Validation runs every --eval-every steps
on --eval-batches batches for both, so both are judged on the same windows.

    python benchmarks/time_to_target.py                      # 764 steps, the quickstart's length here
    python benchmarks/time_to_target.py --steps 300 --muon-lrs 4e-3,1e-2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine

from lmforge.config import load_recipe
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import data_dir_for, prepare
from lmforge.model import Transformer
from lmforge.train.losses import language_model_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import autocast_for
from lmforge.train.trainer import train


def recipe_for(out: Path, steps: int, eval_every: int, eval_batches: int, **train_keys):
    return load_recipe("quickstart", {"run": {"out": str(out), "name": train_keys.pop("name")},
                                      "train": {"max_steps": steps, "checkpoint_every": steps, **train_keys},
                                      "eval": {"every": eval_every, "batches": eval_batches}})


def validations(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]


def steps_to(target: float, curve: list[tuple[int, float]]) -> int | None:
    return next((step for step, bpb in curve if bpb <= target + 1e-9), None)


def step_cost(recipe, data_dir: Path, optimizer: str, muon_lr: float | None, rounds: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one training step with `optimizer`, after warm-up."""
    torch.manual_seed(0)
    recipe.model.vocab_size = TokenSplit(data_dir, "train").vocab_size
    model = Transformer(recipe.model)
    tc = recipe.train.model_copy(update={"optimizer": optimizer, "muon_lr": muon_lr})
    opt = build_optimizer(model, tc, torch.device("cpu"))
    loader = BatchLoader(TokenSplit(data_dir, "train"), tc.batch_size, recipe.model.context, 0)
    walls, cpus = [], []
    for i in range(rounds + 2):
        x, y = loader.batch(i)
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast_for(torch.device("cpu"), tc.dtype):
            loss = language_model_loss(model, model.lm_head, x, y, tc.loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=764)
    p.add_argument("--muon-lrs", default="4e-3,1e-2,2e-2", help="Muon rates to try (train.muon_lr)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15, help="timed steps per optimizer for the step cost")
    p.add_argument("--out", help="run directory root (default: a temporary one)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="time-to-target-"))
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}; runs in {out}")

    common = {"eval_every": args.eval_every, "eval_batches": args.eval_batches}
    base = recipe_for(out, args.steps, name="adamw", **common)
    data_dir = prepare(base.data, data_dir_for(base))
    quiet = dict(progress=False, log=lambda *a: None)
    train(base, **quiet)
    adamw = validations(out / "adamw")
    target = adamw[-1][1]
    print(f"AdamW (lr {base.train.lr}): {args.steps} steps -> val bits/byte {target:.4f} (the target)")

    results = {}
    for lr in (float(x) for x in args.muon_lrs.split(",")):
        name = f"muon-{lr:g}"
        train(recipe_for(out, args.steps, name=name, optimizer="muon", muon_lr=lr, **common), **quiet)
        curve = validations(out / name)
        results[lr] = (steps_to(target, curve), curve[-1][1])
        print(f"Muon (muon_lr {lr:g}): final val bits/byte {curve[-1][1]:.4f}, target reached at step {results[lr][0]}")
    reached = {lr: r for lr, r in results.items() if r[0] is not None}
    if not reached:
        print("Muon did not reach AdamW's validation bits/byte at any rate tried")
        return
    best_lr = min(reached, key=lambda lr: (reached[lr][0], reached[lr][1]))
    muon_steps = reached[best_lr][0]

    costs = {"adamw": [], "muon": []}
    for _ in range(2):  # alternate, so both see the same drift of a shared machine
        costs["adamw"].append(step_cost(base, data_dir, "adamw", None, args.rounds))
        costs["muon"].append(step_cost(base, data_dir, "muon", best_lr, args.rounds))
    wall = {k: statistics.median(c[0] for c in v) for k, v in costs.items()}
    cpu = {k: statistics.median(c[1] for c in v) for k, v in costs.items()}
    adamw_steps = steps_to(target, adamw)
    print(f"\n| optimizer | steps to {target:.4f} bits/byte | s/step wall | s/step CPU | time to target wall | CPU |")
    print("|---|---|---|---|---|---|")
    for k, steps in (("adamw", adamw_steps), ("muon", muon_steps)):
        print(f"| {k}{'' if k == 'adamw' else f' (muon_lr {best_lr:g})'} | {steps} | {wall[k]:.3f} | {cpu[k]:.3f} "
              f"| {steps * wall[k] / 60:.2f} min | {steps * cpu[k] / 60:.2f} min |")
    print(f"\nMuon / AdamW time to target: wall {muon_steps * wall['muon'] / (adamw_steps * wall['adamw']):.2f}x, "
          f"CPU {muon_steps * cpu['muon'] / (adamw_steps * cpu['adamw']):.2f}x (below 1: Muon is faster); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
