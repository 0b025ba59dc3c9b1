"""Batch-1 CPU decoding: lmforge fp32 / int8 / int4 against llama.cpp f32 / q8_0 / q4_0 and
transformers fp32, on the same weights, in one run.

One random Llama-shaped model (--shape 124m, the default: 12 x 768, 4 KV heads, vocab 32000,
~125M parameters; --shape llama-3.2-1b: 16 x 2048, 32 heads, 8 KV heads, ffn 8192, vocab
128256, tied embeddings, rope theta 500000, 1.24B parameters; --layers etc. override either)
is quantized by lmforge (int8 per channel; int4 groups of 128) and exported to GGUF (f32,
q8_0, q4_0: llama.cpp's own formats, every matmul weight included), and saved for
transformers. One format at a time (fp32, int8, int4), lmforge and its llama.cpp counterpart
decode the same prompt greedily with the same thread count, alternating round by round;
medians are reported. Only that pair is in memory with the fp32 model, and its GGUF file is
deleted after it, so the 1B shape peaks near two fp32 copies of the weights. Printed per
lmforge figure: the ratio to its llama.cpp counterpart and the fraction of the bandwidth
roofline (measured read bandwidth / bytes of weights one token reads). Then
time-to-first-token for a long prompt (default 512 tokens), prefill included.

Targets (issue 10): fp32 >= 0.8x llama.cpp f32; int8 >= 1.0x q8_0; int4 >= 0.7x q4_0.

    python benchmarks/cpu_decode.py                      # the full run (~5 min)
    python benchmarks/cpu_decode.py --layers 2 --rounds 1 --new 16 --ttft-prompt 64   # smoke run
    python benchmarks/cpu_decode.py --arch haswell       # lmforge on its AVX2 kernels (any x86 with AVX2)
    python benchmarks/cpu_decode.py --threads 1 --cpu-time   # per CPU second: for a shared, loaded machine
    python benchmarks/cpu_decode.py --emulate-avx2 /work/llama_avx2/lib   # both sides as on an AVX2-only CPU
    python benchmarks/cpu_decode.py --shape llama-3.2-1b --threads 1 --cpu-time --rounds 2 --new 32 --ttft-prompt 128

It prints the CPU's flags, which build of lmforge's kernels ran, and what llama.cpp was built
for: llama.cpp takes its best path for this CPU (AVX-512/VNNI where present) whatever --arch
says, so a forced AVX2 run against it is a conservative comparison; --emulate-avx2 restricts
both sides (and PyTorch) to AVX2, benchmarks/build_llama_avx2.sh building the llama.cpp for it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from common import (add_emulation_option, emulate_avx2, emulation_report, interleaved, kernels_build,
                    llama_cpp_build, llama_cpp_decoder, machine, read_bandwidth, refuse)

from lmforge.compress.compare import matmul_bytes
from lmforge.compress.quantize import quantize_model
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.generate import generate_ids
from lmforge.infer.native_decode import NativeDecoder, step_cache, why_not
from lmforge.infer.sampling import SamplingParams
from lmforge.loaded import LoadedModel
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir

TARGETS = {"fp32": ("llama.cpp f32", 0.8), "int8": ("llama.cpp q8_0", 1.0), "int4": ("llama.cpp q4_0", 0.7)}
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
SHAPES = {
    "124m": dict(layers=12, d_model=768, heads=12, kv_heads=4, ffn=2048, vocab=32000, tied=False, rope_theta=10000.0),
    "llama-3.2-1b": dict(layers=16, d_model=2048, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True,
                         rope_theta=500000.0),
}
TRANSFORMERS_UP_TO = 500e6  # parameters: above this the transformers row is left out unless asked for


def sharing_copy(model: Transformer) -> Transformer:
    """A copy of `model` whose parameters and buffers are the original's own tensors: quantizing it
    replaces its layers without a second fp32 copy of the weights."""
    return copy.deepcopy(model, memo={id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def lmforge_decoder(model: Transformer, native: bool = True):
    def decode(prompt: list[int], n: int) -> list[int]:
        out, _ = generate_ids(model, [prompt], SamplingParams(max_new_tokens=n), eos_id=None, native=native)
        return out[0]
    return decode


def transformers_decoder(folder: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()

    @torch.inference_mode()
    def decode(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return decode


def timed(fn, prompt: list[int], n: int, clock=time.perf_counter):
    def run() -> float:
        t = clock()
        out = fn(prompt, n)
        assert len(out) == n, (len(out), n)
        return n / (clock() - t)
    return run


def ttft(fn, prompt: list[int], clock=time.perf_counter):
    def run() -> float:  # a rate (1/s) so that `interleaved` can take its median
        t = clock()
        fn(prompt, 1)
        return 1.0 / (clock() - t)
    return run


def profile(model: Transformer, prompt: list[int], n: int) -> tuple[dict[str, float], float]:
    """Seconds per token in each phase of the native step (decode.c's own timers), and the
    wall time per token of the whole loop (greedy pick and Python included)."""
    cache = model.new_cache(1, len(prompt) + n + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, last_only=True)[:, -1]
        decoder = NativeDecoder.for_cache(model, cache)

        def steps() -> None:
            nonlocal logits
            for _ in range(n):
                logits = step_cache(decoder, cache, [int(logits.argmax())])

        start = time.perf_counter()
        phases = decoder.profile(steps)
        wall = time.perf_counter() - start
    return {k: v / n for k, v in phases.items()}, wall / n


def profile_line(name: str, model: Transformer, prompt: list[int], n: int) -> str:
    phases, wall = profile(model, prompt, n)
    matmul = sum(v for k, v in phases.items() if k.endswith("matmul"))
    rest = {k: v for k, v in phases.items() if not k.endswith("matmul")}
    outside = wall - sum(phases.values())
    return (f"  {name}: {wall * 1e3:.2f} ms/token = matmuls {matmul * 1e3:.2f} ms "
            f"({matmul / wall:.0%}, weights at {matmul_bytes(model) / matmul / 1e9:.1f} GB/s) + "
            + " + ".join(f"{k} {v * 1e3:.3f}" for k, v in rest.items())
            + f" + outside C (sampling, Python) {outside * 1e3:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="124m",
                    help="the model's shape (the flags below override it)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens for the decode runs")
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode run")
    ap.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for time-to-first-token (0: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    ap.add_argument("--transformers", action="store_true",
                    help=f"keep the transformers row above {TRANSFORMERS_UP_TO / 1e6:.0f}M parameters too "
                         "(it saves and loads another fp32 copy)")
    ap.add_argument("--profile", action="store_true", help="also print where lmforge's decode time goes")
    ap.add_argument("--cpu-time", action="store_true",
                    help="tokens per second of the process's CPU time instead of wall time (with --threads 1: "
                         "on a shared, loaded machine what each runtime costs, not how long it waited for a core)")
    ap.add_argument("--arch", help="build lmforge's kernels for this -march instead of the CPU's own "
                                   "(haswell: the AVX2 kernels); sets LMFORGE_NATIVE_ARCH")
    add_emulation_option(ap)
    args = ap.parse_args()
    if args.emulate_avx2 and args.arch:
        refuse("--emulate-avx2 builds lmforge's kernels for haswell: drop --arch")
    emulate_avx2(args.emulate_avx2)
    shape = SHAPES[args.shape]
    for key, value in shape.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.arch:
        os.environ["LMFORGE_NATIVE_ARCH"] = args.arch
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1 (a second thread's spinning would count as work)")
    torch.set_num_threads(args.threads)

    from lmforge.interop.gguf_io import export_gguf

    torch.manual_seed(0)
    context = max(1024, args.ttft_prompt + 8)
    cfg = ModelConfig(family="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                      n_kv_head=args.kv_heads, d_model=args.d_model, d_ff=args.ffn, context=context,
                      tie_embeddings=shape["tied"], rope_theta=shape["rope_theta"])
    fp32 = Transformer(cfg).eval()
    with_transformers = not args.no_transformers and (args.transformers or fp32.num_params() <= TRANSFORMERS_UP_TO)
    tokenizer = train_tokenizer(["placeholder text for the exported files"], vocab_size=300, min_frequency=1)
    loaded = LoadedModel(fp32, tokenizer)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=gen).tolist()
    long_prompt = torch.randint(0, args.vocab, (args.ttft_prompt,), generator=gen).tolist()
    clock = time.process_time if args.cpu_time else time.perf_counter

    reference_path = lmforge_decoder(fp32, native=False)
    reference = reference_path(prompt, 16)
    rates, first, agree, weight_bytes, profiles = {}, {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method, qtype in GGUF_TYPE.items():
            ours = fp32 if method == "fp32" else \
                quantize_model(sharing_copy(fp32), method, args.group_size, log=lambda *a: None)
            reason = why_not(ours)
            if reason:
                raise SystemExit(f"lmforge {method} cannot take the native path here: {reason}")
            weight_bytes[method] = matmul_bytes(ours)
            path = export_gguf(loaded, tmp / f"model-{qtype}.gguf", qtype)
            pair = (f"lmforge {method}", f"llama.cpp {qtype}")
            decoders = {pair[0]: lmforge_decoder(ours),
                        pair[1]: llama_cpp_decoder(path, args.threads, context, args.vocab)}
            if method == "fp32":
                decoders["lmforge fp32 (reference path)"] = reference_path
                if with_transformers:
                    save_model_dir(fp32, tokenizer, tmp / "hf")
                    decoders["transformers fp32"] = transformers_decoder(tmp / "hf")
            agree.update({name: sum(a == b for a, b in zip(fn(prompt, 16), reference))
                          for name, fn in decoders.items()})
            for fn in decoders.values():
                fn(prompt, 4)  # warm-up
            rates.update(interleaved({name: timed(fn, prompt, args.new, clock) for name, fn in decoders.items()},
                                     args.rounds))
            if args.ttft_prompt:
                first.update(interleaved({name: ttft(decoders[name], long_prompt, clock) for name in pair},
                                         args.rounds))
            if args.profile:
                profiles.append(profile_line(method, ours, prompt, args.new))
            del decoders, ours
            gc.collect()  # llama.cpp's model (and its mapping of the file) goes before the next pair loads
            path.unlink()
        bandwidth = read_bandwidth()

    print(f"machine: {machine()}")
    print(emulation_report() if args.emulate_avx2 else f"{kernels_build()}\n{llama_cpp_build()}")
    print(f"model: llama {args.layers} x {args.d_model}, {args.heads} heads, {args.kv_heads} KV heads, ffn {args.ffn}, "
          f"vocab {args.vocab}{', tied embeddings' if cfg.tie_embeddings else ''}, rope theta {cfg.rope_theta:g}, "
          f"{fp32.num_params() / 1e6:.1f}M parameters; prompt {args.prompt}, {args.new} new tokens, batch 1, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds per format"
          + (", tokens per CPU second" if args.cpu_time else "")
          + ("" if with_transformers or args.no_transformers else
             f"; transformers left out above {TRANSFORMERS_UP_TO / 1e6:.0f}M parameters (--transformers keeps it)"))
    print(f"read bandwidth (torch.sum over 1 GiB): {bandwidth / 1e9:.1f} GB/s")
    print(f"{'runtime':>30} {'tok/s':>7} {'MB/token':>9} {'roofline':>9}  vs llama.cpp     greedy tokens = reference")
    for name, r in rates.items():
        method = name.split()[1] if name.startswith("lmforge ") else None
        extra = ""
        if method in weight_bytes and "reference" not in name:
            mb = weight_bytes[method]
            peer, target = TARGETS[method]
            ratio = r / rates[peer]
            extra = (f"{mb / 1e6:9.1f} {r * mb / bandwidth:8.0%}  {ratio:4.2f}x {peer.split()[1]:<5} "
                     f"({'met' if ratio >= target else 'MISSED'}: >= {target}x)")
        print(f"{name:>30} {r:7.1f} {extra:<48} {agree[name]}/16")
    if first:
        unit = "CPU s" if args.cpu_time else "s"
        print(f"time to first token, {args.ttft_prompt}-token prompt (prefill + 1 token):")
        for ours_name, peer in (("lmforge fp32", "llama.cpp f32"), ("lmforge int8", "llama.cpp q8_0"),
                                ("lmforge int4", "llama.cpp q4_0")):
            a, b = 1 / first[ours_name], 1 / first[peer]
            print(f"  {ours_name}: {a:.3f} {unit}   {peer}: {b:.3f} {unit}   ({b / a:.2f}x llama.cpp's speed)")
    if profiles:
        print(f"where a token's time goes (decode.c's phase timers, {args.new} steps; "
              "each phase includes its barrier wait):")
        print("\n".join(profiles))
    print(f"peak resident set of this run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
