"""Speculative decoding at batch 1 on an editing workload: plain decoding vs prompt lookup vs a draft model.

An editing answer repeats most of its prompt. A random model does not do that, so this
benchmark first trains two small llama models, in a minute or two on a CPU, to copy: each
training row is a random passage of `--length` tokens, a separator, and the passage again
(the loss on the copy; one length, so the copy is a fixed relative offset, learnt in a few
hundred steps). The target is `--d-model` x `--layers`, the draft a quarter as wide and two
layers; both learn the copy almost perfectly, as a model fine-tuned to apply small edits
repeats its input. Then, in one engine each and taking turns per round, the target decodes
the copy of fresh passages greedily: plain, with prompt lookup (`--speculative ngram`), and
with the draft model (`--draft`). Printed: tokens/s of each, the speedups, the acceptance
rates, and that all three gave the same tokens.

    python benchmarks/speculative.py                       # a 7.3M target, a 0.3M draft
    python benchmarks/speculative.py --d-model 128 --layers 2 --steps 200 --requests 4   # 0.5M and 0.1M
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from common import machine
from lmforge.config import ModelConfig
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import Speculator
from lmforge.model import Transformer

VOCAB = 512
SEP = 1  # the separator token; 0 is end-of-text


class IdTokenizer:
    """Token ids as text: all the engine needs of a tokenizer here."""

    vocab_size, eos_id = VOCAB, 0

    def decode(self, ids, skip_special=True):
        return " ".join(map(str, ids))


def passage(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]


def train_copier(d_model: int, layers: int, steps: int, length: int, seed: int) -> Transformer:
    cfg = ModelConfig(family="llama", n_layer=layers, n_head=max(2, d_model // 64), n_kv_head=max(2, d_model // 64),
                      d_model=d_model, context=2 * length + 2, vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.reset_parameters(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread wastes nothing on a busy machine
    for step in range(steps):
        rows = []
        for _ in range(32):
            n = length
            p = passage(rng, n)
            rows.append(p + [SEP] + p + [0] * (2 * length + 2 - 2 * n - 1))
        x = torch.tensor(rows)
        logits = model(x[:, :-1])
        target = x[:, 1:].clone()
        for i, row in enumerate(rows):  # the loss on the copy (and its end) only
            sep = row.index(SEP)
            target[i, :sep] = -100
            target[i, 2 * sep + 1:] = -100
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (steps - step) / (0.3 * steps))
        if step % 100 == 0:
            print(f"    step {step}: copy loss {loss.item():.3f}", flush=True)
    torch.set_num_threads(threads)
    print(f"  trained {d_model} x {layers} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M): "
          f"copy loss {loss.item():.3f} after {steps} steps")
    return model.eval()


def decode(model, prompts, new, speculator=None) -> tuple[float, list[list[int]]]:
    with Engine(model, IdTokenizer(), max_batch=1, speculator=speculator) as engine:
        start = time.perf_counter()
        outs = [engine.generate([Request(p, SamplingParams(max_new_tokens=new))])[0] for p in prompts]
        seconds = time.perf_counter() - start
    return sum(o.completion_tokens for o in outs) / seconds, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150, help="training steps of each model")
    ap.add_argument("--length", type=int, default=24, help="passage length in tokens")
    ap.add_argument("--k", type=int, default=6, help="draft tokens per step")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    t = time.perf_counter()
    target = train_copier(args.d_model, args.layers, args.steps, args.length, seed=0)
    draft = train_copier(max(64, args.d_model // 4), 2, args.steps, args.length, seed=1)
    print(f"  training took {time.perf_counter() - t:.0f} s")
    rng = random.Random(123)
    prompts = [passage(rng, args.length) + [SEP] for _ in range(args.requests)]
    new = args.length + 1
    runs = {"plain": lambda: None, "ngram": lambda: Speculator.ngram(args.k),
            "draft": lambda: Speculator.draft_model(draft, target, args.k)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[list[int]]] = {}
    accept: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, make in runs.items():
            spec = make()
            rate, tokens[name] = decode(target, prompts, new, spec)
            rates[name].append(rate)
            if spec is not None:
                accept[name] = spec.stats.acceptance_rate
    med = {name: statistics.median(v) for name, v in rates.items()}
    copied = sum(t[:args.length] == p[:-1] for t, p in zip(tokens["plain"], prompts))
    print(f"batch 1, greedy, {args.requests} requests of {new} new tokens, {args.rounds} rounds (medians); "
          f"{copied}/{args.requests} outputs copy their passage exactly")
    print(f"  plain        {med['plain']:8.1f} tok/s")
    print(f"  prompt lookup {med['ngram']:7.1f} tok/s  {med['ngram'] / med['plain']:.2f}x  "
          f"(k={args.k}, acceptance {accept['ngram']:.2f})")
    print(f"  draft model  {med['draft']:8.1f} tok/s  {med['draft'] / med['plain']:.2f}x  "
          f"(k={args.k}, acceptance {accept['draft']:.2f})")
    same = tokens["plain"] == tokens["ngram"] == tokens["draft"]
    print(f"  same tokens in all three: {same}")


if __name__ == "__main__":
    main()
