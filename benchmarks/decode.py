"""Batch-1 greedy decode: lmforge against `transformers` generate, and against the roofline.

The same random GPT-2-124M-shaped weights run in both (ours saved as a model directory and
loaded by transformers). Decoding one token reads every weight once, so the roofline is
(weight bytes per token) / (measured read bandwidth); we print the fraction reached.

    python benchmarks/decode.py                 # GPT-2 124M shape, 128 new tokens
    python benchmarks/decode.py --layers 2      # a quick smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import interleaved, machine, read_bandwidth

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.generate import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes a decode step must read: every parameter once, except embedding tables that are
    only looked up (one row each), unless the table doubles as the tied output layer."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    lookups = [model.pos_emb.weight] if model.pos_emb is not None else []
    if not model.config.tie_embeddings:
        lookups.append(model.tok_emb.weight)
    return total - sum(t.numel() * t.element_size() for t in lookups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                      d_model=args.d_model, context=1024)
    ours = Transformer(cfg).eval()
    tokenizer = train_tokenizer(["placeholder text for the saved directory"], vocab_size=300, min_frequency=1)
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(ours, tokenizer, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_new_tokens=args.new)

    def ours_rate() -> float:
        t = time.perf_counter()
        out, _ = generate_ids(ours, [prompt[0].tolist()], params, eos_id=None)
        assert len(out[0]) == args.new
        return args.new / (time.perf_counter() - t)

    @torch.inference_mode()
    def theirs_rate() -> float:
        t = time.perf_counter()
        out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.new
        return args.new / (time.perf_counter() - t)

    # Same weights, same greedy tokens: checked once before timing.
    ours_tokens, _ = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=16), eos_id=None)
    with torch.inference_mode():
        hf_tokens = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                    min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    same = ours_tokens[0] == hf_tokens[0, args.prompt:].tolist()

    ours_rate(), theirs_rate()  # warm-up
    rates = interleaved({"lmforge": ours_rate, "transformers": theirs_rate}, args.rounds)
    bandwidth = read_bandwidth()
    per_token = weight_bytes_per_token(ours)
    roofline = bandwidth / per_token
    print(f"machine: {machine()}")
    print(f"model: gpt2 family, {args.layers} layers x {args.d_model}, vocab {args.vocab}, "
          f"{ours.num_params() / 1e6:.1f}M parameters, {per_token / 1e6:.0f} MB of weights read per token (fp32)")
    print(f"greedy tokens identical to transformers: {same}")
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s -> roofline {roofline:.1f} tokens/s")
    for name, r in rates.items():
        print(f"{name:>13}: {r:6.1f} tokens/s  ({r / roofline:5.1%} of roofline, {r * per_token / 1e9:5.1f} GB/s)")
    print(f"ratio lmforge / transformers: {rates['lmforge'] / rates['transformers']:.2f}x  (target >= 1.3x)")
    print(f"fraction of roofline (lmforge): {rates['lmforge'] / roofline:.0%}  (target >= 80%)")


if __name__ == "__main__":
    main()
