"""Batch-1 decode speed of fp32 vs int8 vs int4 (vs w8a8), side by side in one run,
with the fraction of the memory-bandwidth roofline each reaches.

    python benchmarks/quant_decode.py [--model DIR] [--threads N] [--tokens 64]

Without --model it builds a GPT-2 124M-shaped model (12 x 768, vocab 50257, random
weights: speed does not depend on the values). The roofline is the measured read
bandwidth (a sum over a 1 GB buffer) divided by the bytes one token reads (every matmul
weight once, in its stored format). Targets (issue 6): int8 >= 1.8x, int4 >= 2.5x fp32.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from common import read_bandwidth

from lmforge.compress.compare import decode_tokens_per_s, matmul_bytes
from lmforge.native import kernels
from lmforge.compress.quantize import quantize_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer

TARGETS = {"int8": 1.8, "int4": 2.5}


def gpt2_small() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768,
                                   context=1024)).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory (default: GPT-2 124M shape, random weights)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--methods", default="int8,int4,w8a8")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        import lmforge

        base = lmforge.load(args.model).model
        name = args.model
    else:
        base, name = gpt2_small(), "GPT-2 124M shape (random weights)"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"{platform.machine()} capability {torch.backends.cpu.get_cpu_capability()}  threads {torch.get_num_threads()}  "
          f"native kernels {'yes' if kernels() else 'NO'}")
    print(f"# model: {name}; {args.tokens} new tokens per run, median of {args.repeats}")
    bandwidth = read_bandwidth()
    print(f"# measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    variants = [("fp32", base)]
    for method in args.methods.split(","):
        variants.append((method, quantize_model(copy.deepcopy(base), method, args.group_size)))
    # Interleave the variants over the repeats, so a busy moment of a shared machine hurts all alike.
    speeds: dict[str, list[float]] = {m: [] for m, _ in variants}
    for _ in range(args.repeats):
        for method, model in variants:
            speeds[method].append(decode_tokens_per_s(model, args.tokens, repeats=1))
    print(f"{'method':8s} {'MB/token':>9s} {'tokens/s':>9s} {'vs fp32':>8s} {'roofline tok/s':>15s} {'of roofline':>12s}  target")
    fp32 = sorted(speeds["fp32"])[len(speeds["fp32"]) // 2]
    for method, model in variants:
        tps = sorted(speeds[method])[len(speeds[method]) // 2]
        mb = matmul_bytes(model)
        roof = bandwidth / mb
        target = TARGETS.get(method)
        verdict = "" if target is None else (f">= {target}x " + ("met" if tps / fp32 >= target else "MISSED"))
        print(f"{method:8s} {mb / 1e6:9.1f} {tps:9.1f} {tps / fp32:7.2f}x {roof:15.1f} {tps / roof:11.0%}  {verdict}")


if __name__ == "__main__":
    main()
