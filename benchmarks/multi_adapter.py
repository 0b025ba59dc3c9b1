"""Many adapters, one base: decode tokens/s of 16 requests over 4 LoRA adapters in one batch vs
16 requests to one merged model, in one run.

The engine runs in this process (no HTTP: the server's cost per token is the same for both),
on a random-weight model of benchmarks/serve_load.py's shapes (default: "small", 27M
parameters, 8 x 512). Four adapters of rank --rank on every block linear (all-linear, random B)
are written as `lmforge finetune` writes them and read back by the server's own code
(serve/adapters_registry.py); the merged model is the base with the first adapter folded in
(`lmforge merge`'s arithmetic). Each round runs a batch of 16 on both engines, taking turns:
the multi-adapter batch has 4 requests per adapter; the merged batch 16 to its one model.
Every request samples (temperature 1, seeded) exactly --max-tokens tokens (end-of-text does
not stop it here: a row that ended early would leave a smaller batch, and random models end
at different times with and without adapters, so both cases run the same steps). Printed: median
tokens/s per case over --rounds rounds (wall clock, and per CPU-second of this process: the
machine may be shared, and CPU time moves less with its load), the ratio multi-adapter /
merged of those medians and the median of each round's own ratio (the target is >= 0.8x); also
the multi-adapter engine running 16 base-only requests, for what the adapters themselves cost.

    python benchmarks/multi_adapter.py
    python benchmarks/multi_adapter.py --shape quickstart --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import kernels_build, machine
from serve_load import SHAPES

from lmforge.adapters import apply_adapter, apply_lora, save_adapter
from lmforge.config import load_recipe
from lmforge.data.corpora import synthetic_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.loaded import LoadedModel
from lmforge.model import Transformer
from lmforge.model.lora import LoraSettings, lora_layers
from lmforge.serve.adapters_registry import AdapterRegistry

PROMPTS = ["ROMEO:\n", "To be, or not to be", "The king is dead", "Now is the winter of our discontent"]
ADAPTERS = 4
BATCH = 16


def write_adapters(base: Transformer, out: Path, rank: int) -> list[Path]:
    dirs = []
    for i in range(ADAPTERS):
        model = apply_lora(copy.deepcopy(base), LoraSettings(r=rank, alpha=2 * rank))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for b in layer.lora_B:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        dirs.append(save_adapter(model, out / f"adapter-{i}", base="bench-base"))
    return dirs


def run(engine: Engine, tokenizer, adapters: list[str | None], max_tokens: int, round_: int) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU-second of this process)."""
    requests = [Request(tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                        SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=1000 * round_ + i),
                        adapter=adapters[i % len(adapters)]) for i in range(BATCH)]
    start, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(requests, timeout=900)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(r.completion_tokens == max_tokens for r in results), "a request ended early"
    tokens = sum(r.completion_tokens for r in results)
    return tokens / elapsed, tokens / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    recipe = load_recipe("quickstart")
    tokenizer = train_tokenizer(synthetic_documents(), vocab_size=recipe.data.tokenizer.vocab_size)
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_id = None  # every request decodes --max-tokens tokens
    cfg = recipe.model.model_copy(update={"vocab_size": tokenizer.vocab_size, "context": 512, **SHAPES[args.shape]})
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"{machine()}; {kernels_build()}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(base, Path(tmp), args.rank)
        merged = apply_adapter(LoadedModel(copy.deepcopy(base), tokenizer), dirs[0], merge=True).model.eval()
        multi = Engine(base, tokenizer, max_batch=BATCH)
        registry = AdapterRegistry(multi, "base")
        names = [registry.load(f"adapter-{i}", d).name for i, d in enumerate(dirs)]
    print(f"model: {args.shape} ({params:.0f}M parameters, vocabulary {tokenizer.vocab_size}); {ADAPTERS} adapters "
          f"of rank {args.rank} on every block linear ({registry.engine.adapters[names[0]].nbytes / 2**20:.1f} MiB "
          f"each); batch {BATCH}, max_tokens {args.max_tokens}, {args.rounds} rounds")
    rates: dict[str, list[tuple[float, float]]] = {}
    with multi, Engine(merged, tokenizer, max_batch=BATCH) as single:
        cases = {"merged model": (single, [None]), "4 adapters": (multi, names), "base rows only": (multi, [None])}
        for engine, adapters in cases.values():  # warm up
            run(engine, tokenizer, adapters, 8, -1)
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                rates.setdefault(name, []).append(run(*cases[name][:1], tokenizer, cases[name][1], args.max_tokens, r))
    for i, unit in enumerate(("tok/s", "tok/CPU-s")):
        med = {name: statistics.median(x[i] for x in v) for name, v in rates.items()}
        for name, rate in med.items():
            print(f"{name:>16}: {rate:8.1f} {unit}  (rounds: {', '.join(f'{x[i]:.0f}' for x in rates[name])})")
        per_round = statistics.median(a[i] / m[i] for a, m in zip(rates["4 adapters"], rates["merged model"]))
        print(f"{unit}: 4 adapters in one batch / merged model {med['4 adapters'] / med['merged model']:.2f}x "
              f"(median of each round's ratio {per_round:.2f}x; base rows on the same engine "
              f"{med['base rows only'] / med['merged model']:.2f}x)")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
