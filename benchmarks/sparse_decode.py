"""A 2:4-pruned model against the same pruned model stored dense: file size, batch-1 decode
speed (native decoder: the 2:4 kernel reading the compact form vs the fp32 kernel reading the
zeros) and logits, in one run.

    python benchmarks/sparse_decode.py [--shape small|base] [--tokens 32] [--repeats 3] [--cpu-time] [--batch 1]
    LMFORGE_NATIVE_ARCH=haswell python benchmarks/sparse_decode.py   # the AVX2 kernels

Shapes (Llama family, random weights magnitude-pruned 2:4: speed does not depend on the
values): small 8 x 512 (d_ff 1408, vocab 8192), base 12 x 768 (d_ff 2048, vocab 32000). Both
directories are written by lmforge (`lmforge prune --pattern 2:4` writes the compact one; the
dense one is the same model re-saved) and read back through lmforge.load. Targets (issue 23):
file <= 0.6x dense, batch-1 decode >= 1.4x dense, logits equal within float tolerance.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from common import interleaved, kernels_build, machine

import lmforge
from lmforge.compress.compare import decode_tokens_per_s
from lmforge.compress.prune import run_prune
from lmforge.config import ModelConfig
from lmforge.data.corpora import synthetic_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir
from lmforge.model_files import WEIGHTS

SHAPES = {"small": dict(n_layer=8, d_model=512, n_head=8, d_ff=1408, vocab_size=8192),
          "base": dict(n_layer=12, d_model=768, n_head=12, d_ff=2048, vocab_size=32000)}
TARGETS = {"file": 0.6, "speed": 1.4, "batched speed": 1.0}  # batches: not slower than dense


@torch.inference_mode()
def cpu_tokens_per_s(model: Transformer, tokens: int, batch: int = 1) -> float:
    """Native decoding speed (tokens of all `batch` sequences per second) in this thread's CPU
    time (one thread): what a busy shared machine's descheduling does not inflate."""
    from lmforge.infer.native_decode import NativeDecoder, step_cache

    cache = model.new_cache(batch, capacity=tokens + 2)
    model(torch.zeros(batch, 1, dtype=torch.long), cache, last_only=True)
    decoder = NativeDecoder.for_cache(model, cache)
    start = time.thread_time()
    for t in range(tokens):
        step_cache(decoder, cache, [(t + 7 * b) % model.config.vocab for b in range(batch)])
    return tokens * batch / (time.thread_time() - start)


EMBEDDINGS = ("tok_emb", "embed_tokens")  # lmforge's and the Hugging Face Llama names


def file_parts_mb(path: Path) -> dict[str, float]:
    """MB of a weights file's tensors by part: 2:4 values and indices, the embedding, the lm_head
    (none where it is tied to the embedding), the rest."""
    from safetensors import safe_open

    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}
    parts = dict.fromkeys(("2:4 values", "2:4 indices", "embedding", "lm_head", "dense rest"), 0.0)
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            part = ("2:4 values" if name.endswith(".values") else "2:4 indices" if name.endswith(".indices")
                    else "embedding" if name.split(".")[-2] in EMBEDDINGS else "lm_head" if name.startswith("lm_head")
                    else "dense rest")
            parts[part] += math.prod(t.get_shape()) * itemsize[t.get_dtype()] / 1e6
    return parts


@torch.inference_mode()
def phase_ms(model: Transformer, steps: int) -> dict[str, float]:
    """Milliseconds per token in each phase of the native step (decode.c's profile)."""
    from lmforge.infer.native_decode import NativeDecoder, step_cache

    cache = model.new_cache(1, capacity=steps + 1)
    decoder = NativeDecoder.for_cache(model, cache)
    seconds = decoder.profile(lambda: [step_cache(decoder, cache, [t % model.config.vocab]) for t in range(steps)])
    return {phase: 1e3 * s / steps for phase, s in seconds.items() if s > 0}


@torch.inference_mode()
def native_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    from lmforge.infer.native_decode import NativeDecoder, step_cache

    cache = model.new_cache(1, capacity=len(tokens) + 1)
    decoder = NativeDecoder.for_cache(model, cache)
    return torch.stack([step_cache(decoder, cache, [t])[0] for t in tokens])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="base")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true", help="time one thread's CPU time, not wall time")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (with --cpu-time)")
    args = ap.parse_args(argv)
    if args.batch != 1 and not args.cpu_time:
        ap.error("--batch needs --cpu-time (the wall-time rate is compress.compare's batch-1 one)")
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {machine()}")
    print(f"# {kernels_build()}")
    tokenizer = train_tokenizer(synthetic_documents(), vocab_size=512)  # the vocabulary is padded to the shape's
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        shape = SHAPES[args.shape]
        cfg = ModelConfig(family="llama", context=256, **{**shape, "vocab_size": max(shape["vocab_size"], tokenizer.vocab_size)})
        model = Transformer(cfg).eval()
        params = model.num_params()
        save_model_dir(model, tokenizer, tmp / "base")
        del model
        run_prune(tmp / "base", tmp / "sparse", 0.5, "magnitude", "2:4")
        sparse = lmforge.load(tmp / "sparse")
        sparse.save(tmp / "dense")
        dense = lmforge.load(tmp / "dense")
        sizes = {name: (tmp / name / WEIGHTS).stat().st_size for name in ("dense", "sparse")}
        parts = {name: file_parts_mb(tmp / name / WEIGHTS) for name in ("dense", "sparse")}
        print(f"# shape {args.shape}: {params / 1e6:.1f}M parameters ({cfg.n_layer} x {cfg.d_model}, d_ff {cfg.ffn_dim}, "
              f"vocab {cfg.vocab}); batch {args.batch}, {args.tokens} new tokens per sequence per run, median of {args.repeats} interleaved, "
              f"{'CPU time of 1 thread' if args.cpu_time else f'wall time, {torch.get_num_threads()} threads'}")
        steps = torch.randint(0, cfg.vocab, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        a, b = native_logits(sparse.model, steps), native_logits(dense.model, steps)
        diff = ((a - b).abs().max() / b.abs().max()).item()
        rate = (lambda m: cpu_tokens_per_s(m, args.tokens, args.batch)) if args.cpu_time else \
            (lambda m: decode_tokens_per_s(m, args.tokens, repeats=1))
        rate(sparse.model), rate(dense.model)  # warm-up: packing, page faults
        speeds = interleaved({"dense": lambda: rate(dense.model), "sparse": lambda: rate(sparse.model)}, args.repeats)
        profiles = {name: phase_ms(m.model, args.tokens) for name, m in (("dense", dense), ("sparse", sparse))}
    file_ratio, speed_ratio = sizes["sparse"] / sizes["dense"], speeds["sparse"] / speeds["dense"]
    speed_target = TARGETS["speed" if args.batch == 1 else "batched speed"]
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"file     dense {sizes['dense'] / 1e6:8.1f} MB  2:4 {sizes['sparse'] / 1e6:8.1f} MB  ratio {file_ratio:.3f}x  "
          f"target <= {TARGETS['file']}x {verdict(file_ratio <= TARGETS['file'])}")
    d, sp = parts["dense"], parts["sparse"]
    linears_dense = d["dense rest"] - sp["dense rest"]  # the block linears (the rest: norms)
    linears_sparse = sp["2:4 values"] + sp["2:4 indices"]
    print(f"  block linears dense {linears_dense:.1f} MB -> 2:4 {linears_sparse:.1f} MB (values {sp['2:4 values']:.1f}, "
          f"indices {sp['2:4 indices']:.1f}): {linears_sparse / linears_dense:.3f}x; embedding {d['embedding']:.1f} MB "
          f"dense in both ({d['embedding'] / (sizes['dense'] / 1e6):.1%} of the dense file), lm_head {d['lm_head']:.1f} / "
          f"{sp['lm_head']:.1f} MB; "
          f"rest {sp['dense rest']:.1f} MB")
    print(f"decode   dense {speeds['dense']:8.2f} tok/s  2:4 {speeds['sparse']:8.2f} tok/s  ratio {speed_ratio:.2f}x  "
          f"target >= {speed_target}x {verdict(speed_ratio >= speed_target)}")
    print("where a batch-1 token's time goes (ms per token, one profiled run each):")
    for phase in profiles["dense"]:
        print(f"  {phase:20s} dense {profiles['dense'][phase]:7.2f}  2:4 {profiles['sparse'].get(phase, 0.0):7.2f}")
    print(f"logits   max |2:4 - dense| / max |dense| over 16 native steps: {diff:.2e}")


if __name__ == "__main__":
    main()
