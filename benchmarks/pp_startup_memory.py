"""Peak resident memory per rank while a pipeline starts: building the whole model and then
dropping the other stages (as `train.parallel pp` did) against building only the process's
stages (`pipeline_parallel.build_stage_model`, what `lmforge train` does now).

Each way runs under torchrun (2 gloo processes, one pipeline of 2 stages): a rank joins the
process group, reads its resident set (`before`: the interpreter, torch, the process group),
makes the model one way, sets up its `Pipeline` (stages kept, schedule made), and reports its
peak resident set (ru_maxrss) and the bytes of the parameters it keeps. Both ways give the
same weights (tests/train/test_pipeline_parallel.py checks it).

    python benchmarks/pp_startup_memory.py                  # llama 12 x 768, vocabulary 32000 (~110M)
    python benchmarks/pp_startup_memory.py --layers 4 --d-model 256 --vocab 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import WORKER_ENV, machine

WAYS = ("whole", "stage")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(way: str, model: dict, out: Path) -> None:
    import torch

    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import Transformer
    from lmforge.train import distributed, pipeline_parallel

    tc = TrainConfig(batch_size=4, parallel="pp", device="cpu")
    ctx, device = distributed.setup(tc.parallel, tc.batch_size, tc.device)
    ctx = pipeline_parallel.pipeline_context(ctx, tc)
    before = rss_bytes()
    cfg = ModelConfig(**model)
    torch.manual_seed(0)
    if way == "whole":
        built = Transformer(cfg).to(device)
    else:
        built = pipeline_parallel.build_stage_model(cfg, tc, ctx, device)
    pipeline_parallel.Pipeline(built, tc, ctx, device)
    kept = sum(p.numel() * p.element_size() for p in built.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"{way}-{ctx.rank}.json").write_text(json.dumps({"before": before, "peak": peak, "kept": kept}))
    distributed.teardown(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # way, model JSON, out dir
    args = ap.parse_args()
    if args.worker:
        way, model, out = args.worker
        worker(way, json.loads(model), Path(out))
        return
    model = {"family": "llama", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
             "context": 256, "vocab_size": args.vocab}
    from lmforge.config import ModelConfig
    from lmforge.train.estimate import count_parameters

    params = count_parameters(ModelConfig(**model), args.vocab).total
    print(f"# peak resident memory per rank at pipeline start-up, 2 processes (gloo), llama "
          f"{args.layers} x {args.d_model}, vocabulary {args.vocab}: {params / 1e6:.1f}M parameters "
          f"({4 * params / 2**20:.0f} MiB fp32)")
    print(f"# {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'way':6} {'rank':>4} {'before MiB':>10} {'peak MiB':>9} {'peak - before':>13} {'kept MiB':>9}")
    out = Path(tempfile.mkdtemp(prefix="lmforge-pp-startup-"))
    for way in WAYS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), "--worker", way, json.dumps(model), str(out)]
        done = subprocess.run(cmd, env=WORKER_ENV, capture_output=True, text=True)
        if done.returncode:
            print(f"{way}: failed (exit {done.returncode}): {done.stderr[-2000:]}")
            continue
        for rank in range(2):
            r = json.loads((out / f"{way}-{rank}.json").read_text())
            mib = {k: r[k] / 2**20 for k in ("before", "peak", "kept")}
            print(f"{way:6} {rank:>4} {mib['before']:>10.0f} {mib['peak']:>9.0f} {mib['peak'] - mib['before']:>13.0f} "
                  f"{mib['kept']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
