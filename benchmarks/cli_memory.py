"""Peak memory of the real CLI steps on a random model of a given shape: each of `lmforge quantize`,
`lmforge export --format gguf` and `lmforge generate` runs in its own fresh process, and its peak
resident set (the kernel's ru_maxrss for that child), its wall time and the machine's swap
traffic while it ran (pswpin/pswpout of /proc/vmstat) are printed next to the size of the fp32
weights.

    python benchmarks/cli_memory.py --shape llama-3.2-1b      # 1.24B parameters: ~30 GB written to --dir
    python benchmarks/cli_memory.py --layers 2 --steps quantize-int8,export-f32   # a smoke run

The model directory and every output are written under --dir (a temporary directory by
default) and deleted at the end, each output as soon as the steps that read it are done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import WORKER_ENV, machine
from cpu_decode import SHAPES

LMFORGE = [sys.executable, "-m", "lmforge.cli"]
STEPS = ("quantize-int8", "quantize-int4", "export-f32", "export-q8_0", "export-q4_0", "export-int8-q8_0",
         "export-int4-q4_0", "generate-fp32", "generate-int8", "generate-int4")

MAKE_MODEL = """
import sys, torch
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir
layers, d, heads, kv, ffn, vocab, tied, theta = sys.argv[2:10]
cfg = ModelConfig(family="llama", vocab_size=int(vocab), n_layer=int(layers), n_head=int(heads), n_kv_head=int(kv),
                  d_model=int(d), d_ff=int(ffn), context=2048, tie_embeddings=tied == "True", rope_theta=float(theta))
torch.manual_seed(0)
model = Transformer(cfg).eval()
text = ["A tokenizer for a random model: it only has to turn a prompt into ids and back."] * 4
save_model_dir(model, train_tokenizer(text, vocab_size=300, min_frequency=1), sys.argv[1])
"""


def swap_pages() -> tuple[int, int]:
    counters = dict(line.split() for line in open("/proc/vmstat"))
    return int(counters.get("pswpin", 0)), int(counters.get("pswpout", 0))


def run_step(argv: list[str]) -> tuple[float, int, tuple[int, int]]:
    """(seconds, peak resident bytes, (pages swapped in, out) on the machine meanwhile) of one process."""
    swap = swap_pages()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=WORKER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{err[-2000:]}")
    after = swap_pages()
    return seconds, usage.ru_maxrss * 1024, (after[0] - swap[0], after[1] - swap[1])


def step_argv(step: str, d: Path) -> list[str]:
    kind, _, what = step.partition("-")
    if kind == "quantize":
        return [*LMFORGE, "quantize", str(d / "fp32"), "--method", what, "--out", str(d / what)]
    if kind == "export":
        source, _, qtype = what.rpartition("-")
        return [*LMFORGE, "export", str(d / (source or "fp32")), "--format", "gguf", "--gguf-type", qtype,
                "--out", str(d / f"{source or 'fp32'}-{qtype}.gguf")]
    return [*LMFORGE, "generate", str(d / what), "--prompt", "The weather today", "--max-tokens", "8"]


def needs(step: str) -> str:
    """The model directory a step reads."""
    kind, _, what = step.partition("-")
    if kind == "export":
        return what.rpartition("-")[0] or "fp32"
    return "fp32" if kind == "quantize" else what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of: {', '.join(STEPS)}")
    ap.add_argument("--dir", type=Path, help="where the model and outputs go (default: a temporary directory)")
    args = ap.parse_args()
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    for i, step in enumerate(steps):
        if needs(step) != "fp32" and f"quantize-{needs(step)}" not in steps[:i]:
            raise SystemExit(f"{step} reads the {needs(step)} model: put quantize-{needs(step)} before it")
    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        values = [shape[k] for k in ("layers", "d_model", "heads", "kv_heads", "ffn", "vocab", "tied", "rope_theta")]
        made = run_step([sys.executable, "-c", MAKE_MODEL, str(d / "fp32"), *map(str, values)])
        weights = sum(f.stat().st_size for f in (d / "fp32").glob("*.safetensors"))
        rows = [("make the fp32 model (init + save)", made)]
        for i, step in enumerate(steps):
            label = "lmforge " + " ".join(step_argv(step, d)[3:]).replace(str(d) + "/", "")
            rows.append((label, run_step(step_argv(step, d))))
            for path in d.glob("*.gguf"):
                path.unlink()
            for model in ("int8", "int4"):  # a quantized directory goes when no later step reads it
                if (d / model).exists() and all(needs(s) != model for s in steps[i + 1:]):
                    shutil.rmtree(d / model)

    print(f"machine: {machine()}")
    print(f"model: {args.shape} shape, {shape['layers']} layers; fp32 weights {weights / 1e9:.2f} GB on disk")
    print(f"{'step':<62} {'seconds':>8} {'peak RSS':>9} {'x fp32':>7} {'swap in/out pages':>18}")
    for name, (seconds, peak, (si, so)) in rows:
        print(f"{name:<62} {seconds:8.1f} {peak / 1e9:7.2f} GB {peak / weights:6.2f}x {si:>9} / {so}")


if __name__ == "__main__":
    main()
