"""Loading a sharded ~1B-parameter model: lmforge.load against transformers' from_pretrained.

A random Llama-shaped model (TinyLlama's shape, 1.1B parameters) is made with
transformers and saved as sharded safetensors. Each loader then runs in a fresh
subprocess, alternating, so that its peak RSS (ru_maxrss) is its own; the files are read
once beforehand so both start from a warm page cache. Peak RSS (VmHWM) is reported whole and as
the growth over the process after its imports (the part loading is responsible for).

Targets: peak RSS <= 1.25x the weights' size; load time <= transformers'.

    python benchmarks/load.py                      # 1.1B, bfloat16, 500 MB shards
    python benchmarks/load.py --layers 2 --rounds 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the parent that forked.
CHILD = r"""
import json, sys, time
import torch

def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

which, path = sys.argv[1], sys.argv[2]
if which == "lmforge":
    import lmforge
else:
    import transformers
base = high_water()
t = time.perf_counter()
if which == "lmforge":
    model = lmforge.load(path).model
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
seconds = time.perf_counter() - t
peak = high_water()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak": peak, "base": base, "params": params,
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def run_child(which: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{which} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_model(folder: Path, args) -> int:
    import torch
    import transformers

    from lmforge.data.tokenizer import train_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.d_model, intermediate_size=args.ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                                   max_position_embeddings=2048, tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(dtype) * 0.02)
    model.save_pretrained(folder, max_shard_size=args.shard)
    train_tokenizer(["a placeholder tokenizer for the benchmark directory"], 300, 1).save(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shard", default="500MB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="reuse (or keep) the model here instead of a temporary directory")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "model"
        t = time.perf_counter()
        if not (folder / "config.json").is_file():
            make_model(folder, args)
        files = sorted(folder.glob("*.safetensors"))
        weights = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache for both loaders alike
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
        print(f"machine: {machine()}")
        print(f"model: llama, {args.layers} layers x {args.d_model}, {args.dtype}, {weights / 1e9:.2f} GB in "
              f"{len(files)} shards (made in {time.perf_counter() - t:.0f} s)")
        results: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
        for _ in range(args.rounds):
            for which in results:
                results[which].append(run_child(which, folder))
        for which, runs in results.items():
            s = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak"] for r in runs)
            growth = statistics.median(r["peak"] - r["base"] for r in runs)
            print(f"{which:>13}: load {s:6.2f} s   peak RSS {peak / 1e9:5.2f} GB ({peak / weights:.2f}x weights)   "
                  f"growth {growth / 1e9:5.2f} GB ({growth / weights:.2f}x)   {runs[0]['params'] / 1e9:.2f}B params "
                  f"{runs[0]['dtype']}")
        ours = statistics.median(r["seconds"] for r in results["lmforge"])
        theirs = statistics.median(r["seconds"] for r in results["transformers"])
        peak = statistics.median(r["peak"] for r in results["lmforge"])
        print(f"load time lmforge / transformers: {ours / theirs:.2f}x  (target <= 1.0x)")
        print(f"peak RSS lmforge / weights: {peak / weights:.2f}x  (target <= 1.25x)")


if __name__ == "__main__":
    main()
