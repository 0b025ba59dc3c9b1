"""Long prompts: time to first token at 4,096 tokens against llama.cpp, chunk sizes, peak
memory, and the int8 KV cache's perplexity change.

One random Llama-shaped model with a 4k+ context (default 8 x 512, 4 KV heads, vocab 32000)
is exported to GGUF f32; lmforge (PyTorch prefill in chunks, then one native step) and
llama.cpp (n_batch 512) each compute the first token of the same prompt with the same
thread count, runs alternating round by round, medians reported. `--chunks` times lmforge's
prefill at each chunk size and records its peak CPU tensor memory. `--ppl-model DIR --ppl-text
FILE` scores a text through an fp32 and an int8 KV cache (windows of the model's context).

    python benchmarks/long_prompt.py                                  # TTFT at 4,096 tokens (~5 min)
    python benchmarks/long_prompt.py --threads 1 --cpu-time          # CPU seconds: for a shared, loaded machine
    python benchmarks/long_prompt.py --emulate-avx2 /work/llama_avx2/lib   # both sides as on an AVX2-only CPU
    python benchmarks/long_prompt.py --layers 2 --prompt 512 --rounds 1 --chunks 128,512   # smoke run
    python benchmarks/long_prompt.py --no-ttft --ppl-model runs/quickstart/model --ppl-text text.txt
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (add_emulation_option, emulate_avx2, emulation_report, interleaved, kernels_build,
                    llama_cpp_build, llama_cpp_decoder, machine)
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.chunked_prefill import DEFAULT_PREFILL_CHUNK, prefill
from lmforge.infer.generate import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.loaded import LoadedModel, load
from lmforge.model import Transformer
from lmforge.model.kv_int8 import new_cache
from lmforge.train.estimate import cpu_peak_bytes


def lmforge_first_token(model: Transformer, chunk: int | None):
    def run(prompt: list[int]) -> int:
        out, _ = generate_ids(model, [prompt], SamplingParams(max_new_tokens=1), eos_id=None, prefill_chunk=chunk)
        return out[0][0]
    return run


def rate(fn, prompt: list[int], clock=time.perf_counter):
    def run() -> float:  # 1/seconds, so that `interleaved` can take its median
        t = clock()
        fn(prompt)
        return 1.0 / (clock() - t)
    return run


@torch.inference_mode()
def perplexity(model: Transformer, ids: list[int], kv_cache_dtype: str, chunk: int | None) -> float:
    """exp(mean next-token loss) over `ids` in windows of the model's context, each fed through
    a cache of `kv_cache_dtype` (every key and value read back from that cache)."""
    window = model.config.context
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        piece = torch.tensor([ids[s:s + window + 1]])
        if piece.shape[1] < 2:
            break
        x, y = piece[:, :-1], piece[:, 1:]
        logits = prefill(model, x, new_cache(model, 1, x.shape[1], kv_cache_dtype), chunk=chunk, all_logits=True)
        total += F.cross_entropy(logits[0].float(), y[0], reduction="sum").item()
        count += y.shape[1]
    return math.exp(total / count)


def ppl_report(model_dir: Path, text_path: Path, chunk: int | None) -> None:
    loaded = load(model_dir)
    ids = loaded.tokenizer.encode(text_path.read_text(encoding="utf-8"))
    model = loaded.model.eval()
    fp = perplexity(model, ids, "auto", chunk)
    q = perplexity(model, ids, "int8", chunk)
    cfg = model.config
    base = new_cache(model, 1, cfg.context)
    small = new_cache(model, 1, cfg.context, "int8")
    print(f"perplexity of {model_dir} ({model.num_params() / 1e6:.1f}M, context {cfg.context}, head_dim {cfg.dim_head}) "
          f"over {text_path.name} ({len(ids):,} tokens): {str(base.k[0].dtype).split('.')[-1]} cache {fp:.4f}, "
          f"int8 cache {q:.4f} ({(q / fp - 1) * 100:+.3f}%); cache bytes {small.nbytes():,} vs {base.nbytes():,} "
          f"({small.nbytes() / base.nbytes():.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time CPU seconds of the process, not wall seconds (needs --threads 1): for a shared, loaded machine")
    ap.add_argument("--chunks", default="", help="also time lmforge at these chunk sizes (comma-separated; 0: none)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument("--ppl-model", type=Path, help="a model directory to score --ppl-text with fp32 and int8 caches")
    ap.add_argument("--ppl-text", type=Path)
    add_emulation_option(ap)
    args = ap.parse_args()
    emulate_avx2(args.emulate_avx2)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1 (a second thread's spinning would count as work)")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.ppl_model:
        if args.ppl_text is None:
            raise SystemExit("--ppl-model needs --ppl-text FILE")
        ppl_report(args.ppl_model, args.ppl_text, DEFAULT_PREFILL_CHUNK)
    if args.no_ttft and not args.chunks:
        return

    from lmforge.interop.gguf_io import export_gguf

    torch.manual_seed(0)
    context = args.prompt + 8
    cfg = ModelConfig(family="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                      n_kv_head=args.kv_heads, d_model=args.d_model, d_ff=args.ffn, context=context,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    print(emulation_report() if args.emulate_avx2 else kernels_build())
    print(f"model: llama {args.layers} x {args.d_model}, {args.kv_heads} KV heads, ffn {args.ffn}, vocab {args.vocab}, "
          f"context {context}, {model.num_params() / 1e6:.1f}M parameters; {args.prompt}-token prompt, batch 1, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds"
          + (", CPU seconds" if args.cpu_time else ""))
    runs = {}
    for c in [int(c) for c in args.chunks.split(",") if c.strip()]:
        runs[f"lmforge chunk {c or 'none'}"] = lmforge_first_token(model, c or None)
    if not args.no_ttft:
        runs[f"lmforge chunk {DEFAULT_PREFILL_CHUNK} (default)"] = lmforge_first_token(model, DEFAULT_PREFILL_CHUNK)
        tokenizer = train_tokenizer(["placeholder text for the exported files"], vocab_size=300, min_frequency=1)
        tmp = tempfile.TemporaryDirectory()
        path = export_gguf(LoadedModel(model, tokenizer), Path(tmp.name) / "model-f32.gguf", "f32")
        llama = llama_cpp_decoder(path, args.threads, context, args.vocab)
        runs["llama.cpp f32"] = lambda p: llama(p, 1)[0]
        if not args.emulate_avx2:  # the emulation's report printed it
            print(llama_cpp_build())
    firsts = {name: fn(prompt) for name, fn in runs.items()}  # warm-up, and the first tokens compared
    clock = time.process_time if args.cpu_time else time.perf_counter
    rates = interleaved({name: rate(fn, prompt, clock) for name, fn in runs.items()}, args.rounds)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    peer = rates.get("llama.cpp f32")
    for name, r in rates.items():
        extra = f"   {r / peer:.2f}x llama.cpp's speed" if peer and name != "llama.cpp f32" else ""
        if name.startswith("lmforge chunk"):
            c = name.split()[2]
            chunk = None if c == "none" else int(c)
            cache = model.new_cache(1, context)
            peak = cpu_peak_bytes(lambda: prefill(model, torch.tensor([prompt]), cache, chunk=chunk))
            extra = f"   peak {peak / 2**20:.0f} MiB beside a {cache.nbytes() / 2**20:.0f} MiB cache" + extra
        print(f"  {name:>30}: time to first token {1 / r:.3f} s   first token {firsts[name]}{extra}")


if __name__ == "__main__":
    main()
