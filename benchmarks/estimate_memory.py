"""`lmforge estimate`'s memory per rank against the peak measured in real training steps.

Each configuration runs the real command, `lmforge train RECIPE` (1 process) or under torchrun
(`--nproc_per_node 2`, gloo), for 2 steps, in a worker that records every CPU allocation with
torch.profiler (profile_memory=True): the CPU allocator keeps a running total of the bytes of
live tensors (kernels' scratch included, malloc's own overhead and fragmentation not), and
the measured peak of a rank is the largest total inside its training steps (the steps are
marked with record_function; data loading, validation and checkpoint writing are outside).
The resident set size would add the allocator's caching and the interpreter and is noisy on a
shared machine; the allocator's total is exact and repeatable. Each rank's peak is compared
with the estimate for that layout (the busiest rank: for pipelines the larger of the stages)
and the error is (estimate - measured) / measured.

    python benchmarks/estimate_memory.py                       # 2 sizes x {no, with} act. ckpt x layouts
    python benchmarks/estimate_memory.py --sizes small --layouts 1,ddp --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine

SIZES = {  # family, n_layer, d_model, n_head, n_kv_head, context, batch
    "small": dict(family="llama", n_layer=2, d_model=128, n_head=4, n_kv_head=2, context=128, batch=8),
    "medium": dict(family="llama", n_layer=4, d_model=256, n_head=8, n_kv_head=4, context=256, batch=8),
    "gpt2": dict(family="gpt2", n_layer=4, d_model=256, n_head=8, context=256, batch=8),
}
LAYOUT_PROCS = {"1": 1, "ddp": 2, "fsdp": 2, "tp": 2, "pp": 2, "pp-gpipe": 2, "fsdp+pp": 4}
SCHEDULES = {"pp-gpipe": "gpipe"}  # a layout name -> its train.pp_schedule
VOCAB = 2048


def worker(out: Path, argv: list[str]) -> None:
    """Run `lmforge <argv>` with the profiler on; write this rank's peak inside the training steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from lmforge.cli import main
    from lmforge.train.run import Run

    take_step = Run._train_step

    def marked_step(self, step):  # mark the steps, so that only their allocations count
        with record_function("estimate_memory_step"):
            return take_step(self, step)

    Run._train_step = marked_step
    sys.argv = ["lmforge", *argv]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        try:
            main()
        except SystemExit as e:
            if e.code:
                raise
    trace = out / f"trace-{os.environ.get('RANK', '0')}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "estimate_memory_step"]
    inside = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
              and any(a <= e["ts"] <= b for a, b in spans)]
    top = max(inside, key=lambda e: e["args"]["Total Allocated"], default=None)
    peak = top["args"]["Total Allocated"] if top else 0
    # the innermost operator running at the peak: where in the step it comes
    ops = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith(("aten::", "autograd::"))
           and top and e["ts"] <= top["ts"] <= e["ts"] + e.get("dur", 0)]
    where = max(ops, key=lambda e: e["ts"])["name"] if ops else ""
    (out / f"peak-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
        {"peak": peak, "at": where, "threads": torch.get_num_threads()}))


def recipe_for(size: dict, data_dir: Path, runs: Path, dtype: str, checkpointed: bool, layout: str) -> dict:
    model = {k: v for k, v in size.items() if k != "batch"}
    parallel = {"1": "auto", "pp-gpipe": "pp"}.get(layout, layout)
    schedule = {"pp_schedule": SCHEDULES[layout]} if layout in SCHEDULES else {}
    return {
        "model": {**model, "vocab_size": VOCAB},
        "data": {"corpus": "synthetic", "dir": str(data_dir), "tokenizer": {"vocab_size": VOCAB}},
        "train": {"batch_size": size["batch"], "max_steps": 2, "warmup": 1, "log_every": 1, "dtype": dtype,
                  "checkpoint_every": 10**6, "activation_checkpointing": checkpointed, "parallel": parallel,
                  "seed": 0, **schedule},
        "eval": {"every": 10**6, "batches": 1},
        "run": {"name": "bench", "out": str(runs)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium", help=f"comma-separated: {', '.join(SIZES)}")
    ap.add_argument("--layouts", default="1,ddp,fsdp,tp,pp,pp-gpipe,fsdp+pp",
                    help="comma-separated: 1 (one process), ddp, fsdp, tp, pp (1F1B), pp-gpipe (2 processes "
                         "each), fsdp+pp (4: 2 pipelines of 2 stages)")
    ap.add_argument("--dtype", default="auto", help="train.dtype (auto: bf16 on CPUs with AVX512-BF16/AMX)")
    ap.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off, on or off,on")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(args.worker, rest)
        return

    import torch
    import yaml

    from lmforge import native
    from lmforge.config import load_recipe
    from lmforge.data.prepare import prepare
    from lmforge.train.estimate import Estimator
    from lmforge.train.precision import resolve_dtype

    work = Path(tempfile.mkdtemp(prefix="lmforge-estimate-memory-"))
    data_dir = work / "data"
    rows = []
    print(f"# estimate vs measured peak per rank (CPU allocator's live-tensor total, torch.profiler), 2 steps")
    print(f"# {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'size':8} {'layout':8} {'ckpt':5} {'dtype':9} {'rank':>4} {'estimate':>10} {'measured':>10} {'error':>7}  peak at")
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        for checkpointed in [c == "on" for c in args.checkpointing.split(",")]:
            for layout in args.layouts.split(","):
                nproc = LAYOUT_PROCS[layout]
                raw = recipe_for(size, data_dir, work / "runs", args.dtype, checkpointed, layout)
                recipe = load_recipe(None, raw)
                prepare(recipe.data, data_dir)
                path = work / f"{size_name}-{layout}-{int(checkpointed)}.yaml"
                path.write_text(yaml.safe_dump(raw))
                out = work / path.stem
                out.mkdir()
                argv = ["train", str(path), "--no-progress", "--run.name", path.stem]
                me = [str(Path(__file__).resolve()), "--worker", str(out)]
                cmd = [sys.executable, *me, *argv] if nproc == 1 else \
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                     *me, *argv]
                log = out / "log.txt"
                with open(log, "w") as f:
                    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
                if code:
                    print(f"{size_name:8} {layout:8} failed (exit {code}); see {log}")
                    continue
                dtype = resolve_dtype(torch.device("cpu"), recipe.train.dtype)
                est = Estimator(recipe, VOCAB, "cpu", dtype, native.elementwise() is not None)
                e = est.estimate({"1": "ddp", "pp-gpipe": "pp"}.get(layout, layout), nproc)
                estimate = (e.memory_checkpointed if checkpointed else e.memory).total
                ranks = [json.loads((out / f"peak-{r}.json").read_text()) for r in range(nproc)]
                peaks = [r["peak"] for r in ranks]
                measured = max(peaks)
                at = ranks[peaks.index(measured)]["at"]
                error = (estimate - measured) / measured
                rows.append({"size": size_name, "layout": layout, "checkpointed": checkpointed, "dtype": dtype,
                             "estimate": estimate, "measured": measured, "peaks": peaks, "error": error, "at": at})
                print(f"{size_name:8} {layout:8} {'on' if checkpointed else 'off':5} {dtype:9} "
                      f"{peaks.index(measured):>4} {estimate / 2**20:>8.1f}Mi {measured / 2**20:>8.1f}Mi "
                      f"{error:>+7.1%}  {at}", flush=True)
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        within = sum(abs(r["error"]) <= 0.15 for r in rows)
        print(f"{within} of {len(rows)} within 15%; worst {worst['error']:+.1%} ({worst['size']} {worst['layout']} "
              f"ckpt {'on' if worst['checkpointed'] else 'off'})")
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"# results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
