"""Prefix caching: time to first token with a shared 1,024-token system prompt (hit vs cold),
and 16 chat clients sharing that system prompt (throughput with vs without the cache).

A random-weight model of serve_load.py's "small" shape (27M parameters, 8 x 512) with the
quickstart tokenizer; the system prompt is 1,024 tokens of synthetic documents, each
request adds its own question. In-process engines (the engine is what the cache changes;
the HTTP layer's cost per request is the same either way).

Time to first token: per round, a cold request (cache emptied) and a hit (a new question
after the same system prompt), taking turns; medians. Throughput: 16 client threads, each
sending `--per-client` greedy requests of `--new` tokens one after another, to an engine
with the cache and to one without, taking turns per round; generated tokens per second.

    python benchmarks/prefix_cache.py
    python benchmarks/prefix_cache.py --rounds 5 --per-client 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from common import machine
from lmforge.config import load_recipe
from lmforge.data.corpora import synthetic_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine, Request
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from serve_load import SHAPES

QUESTIONS = ["Where is my order 48213?", "Can I return a damaged copy?", "Do you ship to Lyon?",
             "我的订单还没到, 怎么办?", "What does express shipping cost?", "Is the 2nd edition in stock?",
             "Can I change my address?", "Why was I charged twice?", "Do you have gift cards?",
             "How long do refunds take?", "Is there a student discount?", "Can I pick up in store?",
             "Where are you based?", "Do you sell e-books?", "My parcel is damaged.", "Can I pay by invoice?"]


def ttft(engine: Engine, prompt: list[int]) -> float:
    first = threading.Event()
    done = threading.Event()

    def on_event(ev):
        if ev.tokens:
            first.set()
        if ev.finish_reason is not None:
            done.set()

    start = time.perf_counter()
    engine.submit(Request(prompt, SamplingParams(max_new_tokens=4)), on_event)
    first.wait()
    seconds = time.perf_counter() - start
    done.wait()
    return seconds


def chat_load(engine: Engine, prompts: list[list[int]], per_client: int, new: int) -> float:
    def client(i: int) -> int:
        n = 0
        for j in range(per_client):
            q = prompts[(i + j * 7) % len(prompts)]
            n += engine.generate([Request(q, SamplingParams(max_new_tokens=new))])[0].completion_tokens
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        tokens = sum(pool.map(client, range(16)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=1, help="requests each of the 16 clients sends per round")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    args = ap.parse_args()
    print(machine())
    recipe = load_recipe("quickstart")
    docs = list(synthetic_documents())
    tokenizer = train_tokenizer(docs, vocab_size=recipe.data.tokenizer.vocab_size)
    cfg = recipe.model.model_copy(update={"vocab_size": tokenizer.vocab_size, "context": args.system_tokens + 256,
                                          **SHAPES[args.shape]})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    system = tokenizer.encode("System: " + " ".join(docs))[:args.system_tokens]
    prompts = [system + tokenizer.encode("\nUser: " + q + "\nAssistant:") for q in QUESTIONS]
    print(f"model: {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), "
          f"system prompt {len(system)} tokens, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens")

    cache = PrefixCache(256 << 20)
    cold, hit = [], []
    with Engine(model, tokenizer, prefix_cache=cache) as engine:
        ttft(engine, prompts[-1])  # warm-up (the native kernels, allocator)
        for r in range(args.rounds):
            cache.clear()
            cold.append(ttft(engine, prompts[2 * r % len(prompts)]))
            hit.append(ttft(engine, prompts[(2 * r + 1) % len(prompts)]))
    c, h = statistics.median(cold), statistics.median(hit)
    print(f"time to first token, {args.rounds} rounds: cold {c * 1000:.0f} ms, hit {h * 1000:.0f} ms: "
          f"{c / h:.1f}x (hit rate {cache.stats.hit_rate:.2f} of looked-up prompt tokens)")

    on_rates, off_rates = [], []
    for _ in range(args.rounds):
        for rates, with_cache in ((on_rates, True), (off_rates, False)):
            with Engine(model, tokenizer, prefix_cache=PrefixCache(256 << 20) if with_cache else None) as engine:
                rates.append(chat_load(engine, prompts, args.per_client, args.new))
    on, off = statistics.median(on_rates), statistics.median(off_rates)
    print(f"16 clients x {args.per_client} requests of {args.new} tokens, {args.rounds} rounds: "
          f"with the cache {on:.1f} tok/s, without {off:.1f} tok/s: {on / off:.1f}x")


if __name__ == "__main__":
    main()
