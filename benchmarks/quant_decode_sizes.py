"""Decode step time of fp32, int8 and int4 across model sizes, from the quickstart's 2M model
up: is any quantized format slower than fp32 at some size?

    python benchmarks/quant_decode_sizes.py [--threads N] [--rounds 30] [--shapes "quickstart 4x192,8x384"]
                                            [--library OTHER.so] [--batch 16] [--cpu-time]
    LMFORGE_NATIVE_ARCH=haswell python benchmarks/quant_decode_sizes.py   # the AVX2 kernels
    python benchmarks/quant_decode_sizes.py --threads 1 --cpu-time         # on a shared, loaded machine

int8 and int4 are what the decoder runs: a step of DEQUANTIZE_MIN_ROWS rows or more of a model
within infer.native_decode.DEQUANTIZE_MAX_MIB runs on fp32 copies of the dequantized weights
("copies"); wherever it does, the integer kernels are timed beside ("int8 kernels", "int4
kernels"), so the figures show both sides of the crossover. `--dequantize-max-mib N` puts the
limit at N MiB for every format (a sweep: 100000 times both paths at every size). `--cpu-time`
times the process's CPU seconds instead of the wall clock (with one thread: another thread's
spinning would count), which a busy machine disturbs less.

Random weights (speed does not depend on the values), Llama-shaped models, each step one
call into native/decode.c (what `lmforge generate` and `lmforge compare` run). The variants
of one size are interleaved round by round (20 steps a round), so a busy moment of a shared
machine hurts all alike; it prints the 10th percentile and the median of the rounds, in
microseconds a step. `--library` adds the int8/int4 variants run by another build of the
kernels (e.g. one compiled from an earlier decode.c), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import time

import torch

from common import kernels_build, machine

from lmforge import native
from lmforge.compress.quantize import fitting_group_size, quantize_model
from lmforge.config import ModelConfig
from lmforge.infer.native_decode import DEQUANTIZE_MIN_ROWS, NativeDecoder, fp32_bytes
from lmforge.model import Transformer

# (name, n_layer, d_model, n_head, n_kv_head, vocab): the quickstart recipe's model first.
SHAPES = [
    ("quickstart 4x192", 4, 192, 6, 2, 2048),
    ("6x256", 6, 256, 8, 4, 4096),
    ("8x384", 8, 384, 6, 2, 8192),
    ("12x768", 12, 768, 12, 4, 32000),
]
PROMPT, STEPS = 8, 20


def build(n_layer: int, d_model: int, n_head: int, n_kv: int, vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv,
                      d_model=d_model, context=256)
    return Transformer(cfg).eval()


def load_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name, (args, result) in native.SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def decoder(model: Transformer, lib, batch: int = 1, dequantize_max_bytes: int | None = None) -> NativeDecoder:
    cache = model.new_cache(batch, capacity=PROMPT + STEPS + 1)
    with torch.no_grad():
        model(torch.arange(PROMPT)[None].repeat(batch, 1), cache)
    return NativeDecoder(model, cache.k, cache.v, lib, dequantize_max_bytes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--library", help="another build of the kernels, for its int8/int4 steps beside ours")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (a server's batch)")
    ap.add_argument("--cpu-time", action="store_true", help="time CPU seconds of the process (needs --threads 1)")
    ap.add_argument("--dequantize-max-mib", type=float, default=None,
                    help="fp32 MiB up to which many-row steps run on fp32 copies (default: the decoder's rule)")
    args = ap.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1 (a second thread's spinning would count as work)")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    libs = {"": native.kernels()}
    if args.library:
        libs[" (other)"] = load_library(args.library)
    limit = None if args.dequantize_max_mib is None else int(args.dequantize_max_mib * 2**20)
    rule = "the decoder's rule" if limit is None else f"up to {args.dequantize_max_mib:g} MiB"
    print(f"# {machine()}; batch {args.batch}; {'CPU' if args.cpu_time else 'wall'} us a step, 10th percentile / "
          f"median of {args.rounds} rounds of {STEPS} steps; "
          f"fp32 copies for batches >= {DEQUANTIZE_MIN_ROWS} by {rule}")
    print(f"# {kernels_build()}")
    wanted = args.shapes.split(",")
    for name, *shape in SHAPES:
        if name not in wanted:
            continue
        base = build(*shape)
        models = {"fp32": base, "int8": quantize_model(copy.deepcopy(base), "int8"),
                  "int4": quantize_model(copy.deepcopy(base), "int4", fitting_group_size(base))}
        decoders = {f"{m}{tag}": decoder(model, lib, args.batch, limit) for tag, lib in libs.items()
                    for m, model in models.items() if not (m == "fp32" and tag)}
        copies = [k for k, d in decoders.items() if k != "fp32" and d.dequantized and args.batch >= DEQUANTIZE_MIN_ROWS]
        decoders.update({f"{k.replace(' (', ' kernels (') if '(' in k else k + ' kernels'}":
                         decoder(models[k.split()[0]], libs[k[len(k.split()[0]):]], args.batch, 0) for k in copies})
        times: dict[str, list[float]] = {k: [] for k in decoders}
        for _ in range(args.rounds):
            for key, d in decoders.items():
                start = clock()
                for i in range(STEPS):
                    d.step([5] * args.batch, [PROMPT + i] * args.batch, [PROMPT + i] * args.batch)
                times[key].append((clock() - start) / STEPS * 1e6)
        p10 = {k: sorted(v)[len(v) // 10] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{k} {p10[k]:.0f} / {med[k]:.0f}" + ("" if k == "fp32" else f" ({p10['fp32'] / p10[k]:.2f}x)")
                 for k in decoders]
        print(f"{name} (fp32 weights {fp32_bytes(base) / 2**20:.1f} MiB; fp32 copies: {', '.join(copies) or 'none'}): "
              + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
