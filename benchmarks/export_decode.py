"""Batch-1 greedy decode of one small model in lmforge, onnxruntime and llama.cpp.

A random Llama-shaped model (~125M parameters) is exported to ONNX (fp32, and int8 by
onnxruntime's dynamic quantization) and to GGUF (f16, q8_0). Each runtime decodes the
same prompt greedily, with 2 threads; runs alternate and medians are reported.
llama.cpp runs through llama-cpp-python when it is installed (`pip install
llama-cpp-python` builds it from source, ~5 min here); otherwise its rows are skipped
and the output says so.

    python benchmarks/export_decode.py
    python benchmarks/export_decode.py --layers 2 --rounds 1     # a quick smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import interleaved, llama_cpp_decoder, machine

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.generate import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.loaded import LoadedModel
from lmforge.model import Transformer


def onnx_decoder(path: Path, cfg: ModelConfig, threads: int):
    import onnxruntime as ort

    from lmforge.interop.onnx_export import io_names

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs, _ = io_names(cfg.n_layer)

    def decode(prompt: list[int], n: int) -> list[int]:
        past = [np.zeros((1, cfg.kv_heads, 0, cfg.dim_head), np.float32) for _ in range(2 * cfg.n_layer)]
        ids, out = np.array([prompt], dtype=np.int64), []
        for _ in range(n):
            logits, *past = session.run(None, {"input_ids": ids, **dict(zip(inputs[1:], past))})
            out.append(int(logits[0, -1].argmax()))
            ids = np.array([[out[-1]]], dtype=np.int64)
        return out

    return decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.interop.gguf_io import export_gguf
    from lmforge.interop.onnx_export import export_onnx

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                      n_kv_head=args.kv_heads, d_model=args.d_model, d_ff=args.ffn, context=512,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    tokenizer = train_tokenizer(["placeholder text for the exported files"], vocab_size=300, min_frequency=1)
    loaded = LoadedModel(model, tokenizer)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    decoders = {"lmforge (torch fp32)":
                lambda p, n: generate_ids(model, [p], SamplingParams(max_new_tokens=n), eos_id=None)[0][0]}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        export_onnx(loaded, tmp / "onnx", quantize="int8")
        onnx_s = time.perf_counter() - t
        decoders["onnxruntime fp32"] = onnx_decoder(tmp / "onnx" / "model.onnx", cfg, args.threads)
        decoders["onnxruntime int8"] = onnx_decoder(tmp / "onnx" / "model.int8.onnx", cfg, args.threads)
        try:
            import llama_cpp  # noqa: F401

            for qtype in ("f16", "q8_0"):
                path = export_gguf(loaded, tmp / f"model-{qtype}.gguf", qtype)
                decoders[f"llama.cpp {qtype}"] = llama_cpp_decoder(path, args.threads, cfg.context, cfg.vocab)
        except ImportError:
            notes.append("llama.cpp: skipped, llama-cpp-python is not installed (pip install llama-cpp-python)")

        reference = decoders["lmforge (torch fp32)"](prompt, 16)
        agree = {name: sum(a == b for a, b in zip(fn(prompt, 16), reference)) for name, fn in decoders.items()}

        def rate(fn):
            def run() -> float:
                t = time.perf_counter()
                out = fn(prompt, args.new)
                assert len(out) == args.new
                return args.new / (time.perf_counter() - t)
            return run

        for fn in decoders.values():
            fn(prompt, 4)  # warm-up
        rates = interleaved({name: rate(fn) for name, fn in decoders.items()}, args.rounds)

    print(f"machine: {machine()}")
    print(f"model: llama, {args.layers} layers x {args.d_model}, vocab {args.vocab}, "
          f"{model.num_params() / 1e6:.1f}M parameters; prompt {args.prompt}, {args.new} new tokens, batch 1, "
          f"{args.threads} threads; ONNX export took {onnx_s:.0f} s")
    base = rates["lmforge (torch fp32)"]
    for name, r in rates.items():
        print(f"{name:>22}: {r:7.1f} tokens/s  ({r / base:4.2f}x lmforge)   first 16 greedy tokens equal to "
              f"lmforge's: {agree[name]}/16")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
