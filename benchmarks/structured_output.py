"""Structured-output overhead: decode tokens/s with a JSON schema vs unconstrained, in one run.

The engine runs in this process (no HTTP: the server's cost per token is the same for both),
on a random-weight model of benchmarks/serve_load.py's shapes (default: "small", 27M
parameters, 8 x 512). Each round runs a batch of 1 and a batch of 16 requests, free and
constrained taking turns; every request samples (temperature 1, seeded) up to --max-tokens
tokens. The constrained requests follow a JSON schema whose last string is longer than
--max-tokens can hold, so they run as long as the free ones (checked): the comparison is
per step, not of outputs of different lengths. Printed: median tokens/s per case over
--rounds rounds and the ratio constrained / free (the target is >= 0.85x at both batch sizes).

    python benchmarks/structured_output.py
    python benchmarks/structured_output.py --shape quickstart --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import machine
from serve_load import SHAPES

from lmforge.config import load_recipe
from lmforge.data.corpora import synthetic_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.serve.structured import json_schema_grammar

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "notes": {"type": "string", "minLength": 1000}}, "required": ["name", "age", "email", "tags", "notes"], "additionalProperties": False}
PROMPTS = ["ROMEO:\n", "To be, or not to be", "The king is dead", "Now is the winter of our discontent"]


def run(engine: Engine, tokenizer, batch: int, grammar: str | None, max_tokens: int, round_: int) -> float:
    requests = [Request(tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                        SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=1000 * round_ + i),
                        grammar=grammar) for i in range(batch)]
    start = time.perf_counter()
    results = engine.generate(requests, timeout=600)
    elapsed = time.perf_counter() - start
    if grammar is not None:
        assert all(r.finish_reason == "length" for r in results), "a constrained output ended early"
    return sum(r.completion_tokens for r in results) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()

    recipe = load_recipe("quickstart")
    tokenizer = train_tokenizer(synthetic_documents(), vocab_size=recipe.data.tokenizer.vocab_size)
    cfg = recipe.model.model_copy(update={"vocab_size": tokenizer.vocab_size, "context": 512, **SHAPES[args.shape]})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    grammar = json_schema_grammar(SCHEMA, "schema")
    print(f"{machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"model: {args.shape} ({params:.0f}M parameters, vocabulary {tokenizer.vocab_size}), "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds")
    rates: dict[tuple[int, str], list[float]] = {}
    with Engine(model, tokenizer, max_batch=max(args.batches)) as engine:
        run(engine, tokenizer, 2, grammar, 8, -1)  # warm up both paths
        run(engine, tokenizer, 2, None, 8, -1)
        for r in range(args.rounds):
            for batch in args.batches:
                for name, g in (("free", None), ("json", grammar)) if r % 2 == 0 else (("json", grammar), ("free", None)):
                    rates.setdefault((batch, name), []).append(run(engine, tokenizer, batch, g, args.max_tokens, r))
    for batch in args.batches:
        free, json_ = (statistics.median(rates[(batch, k)]) for k in ("free", "json"))
        print(f"batch {batch:2d}: free {free:8.1f} tok/s   json schema {json_:8.1f} tok/s   ratio {json_ / free:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
