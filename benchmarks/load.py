"""Importing and loading a sharded bf16 checkpoint at a real size: memory and time against transformers.

A random Llama-3.2-3B-shaped checkpoint (28 x 3072, GQA 24/8 heads, ffn 8192, vocab 128256, tied
embeddings; 3.2B parameters, 6.4 GB in bfloat16) is written shard by shard with `safetensors`
directly, as a Hugging Face directory (config.json, model-0000i-of-0000n.safetensors, the index),
5 GB shards as the Hub's checkpoints have them. Each measured step then runs in its own fresh
process, so its peak resident set (VmHWM, read by the process itself at its end) is its own:

    import        `lmforge import DIR --out OUT` (the CLI's entry point; reads, converts, writes, hashes)
    load          `lmforge.load(DIR)`
    hf-load       transformers' `from_pretrained(DIR)` (the peer)
    hf-load-save  `from_pretrained` + `save_pretrained`, transformers' way to re-write a checkpoint

Target (issue 19): import never holds the weights twice: peak RSS <= the model + 1.1x the largest
shard. The files are read once beforehand so every step starts from a warm page cache.

    python benchmarks/load.py                          # the 3B shape, one round
    python benchmarks/load.py --shape 1b --rounds 3    # TinyLlama's 1.1B shape
    python benchmarks/load.py --shape tiny             # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import WORKER_ENV, machine

SHAPES = {  # layers, d_model, ffn, heads, kv heads, vocab, tied embeddings
    "3b": (28, 3072, 8192, 24, 8, 128256, True),
    "1b": (22, 2048, 5632, 32, 4, 32000, False),
    "tiny": (2, 256, 512, 4, 2, 4096, False),
}
STEPS = ("import", "load", "hf-load", "hf-load-save")

CHILD = r"""
import json, sys, time

def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

step, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
if step in ("import", "load"):
    import lmforge
    from lmforge.cli import main
else:
    import transformers
base = high_water()
t = time.perf_counter()
if step == "import":
    sys.argv = ["lmforge", "import", path, "--out", out]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
elif step == "load":
    model = lmforge.load(path).model
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    if step == "hf-load-save":
        model.save_pretrained(out)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak": high_water(), "base": base}))
"""


def run_step(step: str, path: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, step, str(path), str(out)], capture_output=True, text=True,
                       env=WORKER_ENV)
    if r.returncode:
        raise SystemExit(f"{step} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def hf_tensors(shape: tuple) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes, in the order transformers saves them."""
    layers, d, ffn, heads, kv_heads, vocab, tied = shape
    kv = d // heads * kv_heads
    names = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                  (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                  (p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d)),
                  (p + "mlp.down_proj.weight", (d, ffn)), (p + "input_layernorm.weight", (d,)),
                  (p + "post_attention_layernorm.weight", (d,))]
    names.append(("model.norm.weight", (d,)))
    if not tied:
        names.append(("lm_head.weight", (vocab, d)))
    return names


def make_checkpoint(folder: Path, shape: tuple, shard_bytes: int) -> list[int]:
    """A random bf16 checkpoint written with safetensors, one shard in memory at a time; the shard sizes."""
    import torch
    from safetensors.torch import save_file

    from lmforge.data.tokenizer import train_tokenizer

    layers, d, ffn, heads, kv_heads, vocab, tied = shape
    folder.mkdir(parents=True)
    # Values are drawn once into a pool and each tensor takes a slice of it: loading cost does not
    # depend on the values, and drawing 3B normals would take minutes on a small machine.
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for i, (name, tensor_shape) in enumerate(hf_tensors(shape)):
        n = int(torch.Size(tensor_shape).numel())
        if len(tensor_shape) == 1:
            tensor = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            start = (i * 7919) % pool.numel()
            tensor = pool.roll(-start).repeat(n // pool.numel() + 1)[:n].view(tensor_shape).clone()
        if shards[-1] and size + 2 * n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += 2 * n
        if size >= shard_bytes:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map, sizes = {}, []
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        sizes.append((folder / file).stat().st_size)
        shards[k] = {}
    total = sum(2 * int(torch.Size(s).numel()) for _, s in hf_tensors(shape))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": d // heads, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied, "hidden_act": "silu",
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer(["a placeholder tokenizer for the benchmark directory"], 300, 1).save(folder)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="3b")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest shard of the checkpoint (GB, 1e9 bytes)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--dir", type=Path, help="reuse (or keep) the checkpoint here instead of a temporary directory")
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = args.dir or Path(tmp) / "checkpoint"
        t = time.perf_counter()
        if not (folder / "config.json").is_file():
            make_checkpoint(folder, SHAPES[args.shape], int(args.shard_gb * 1e9))
        files = sorted(folder.glob("*.safetensors"))
        weights, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        for f in files:  # a warm page cache for every step alike
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
        layers, d, *_ = SHAPES[args.shape]
        print(f"machine: {machine()}")
        print(f"checkpoint: llama {layers} x {d}, bfloat16, {weights / 1e9:.2f} GB in {len(files)} shards, largest "
              f"{largest / 1e9:.2f} GB (made in {time.perf_counter() - t:.0f} s)")
        results: dict[str, list[dict]] = {s: [] for s in steps}
        for _ in range(args.rounds):
            for step in steps:
                out = Path(tmp) / f"out-{step}"
                results[step].append(run_step(step, folder, out))
                shutil.rmtree(out, ignore_errors=True)
        for step, runs in results.items():
            s = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak"] for r in runs)
            growth = statistics.median(r["peak"] - r["base"] for r in runs)
            print(f"{step:>13}: {s:7.1f} s   peak RSS {peak / 1e9:5.2f} GB ({peak / weights:.2f}x the weights)   "
                  f"growth after imports {growth / 1e9:5.2f} GB ({growth / weights:.2f}x)")
        if "import" in results:
            peak = statistics.median(r["peak"] for r in results["import"])
            budget = weights + 1.1 * largest
            print(f"import peak RSS {peak / 1e9:.2f} GB vs the target's {budget / 1e9:.2f} GB (model + 1.1x largest "
                  f"shard): {peak / budget:.2f}x of it, {'met' if peak <= budget else 'MISSED'}")
            for peer in ("hf-load", "hf-load-save"):
                if peer in results:
                    theirs = statistics.median(r["peak"] for r in results[peer])
                    seconds = statistics.median(r["seconds"] for r in results[peer])
                    ours = statistics.median(r["seconds"] for r in results["import"])
                    print(f"import / {peer}: peak RSS {peak / theirs:.2f}x, time {ours / seconds:.2f}x")


if __name__ == "__main__":
    main()
