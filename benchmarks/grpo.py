"""GRPO on the built-in arithmetic task: held-out accuracy after SFT alone and after SFT + GRPO,
and the rollouts' speed (issue 24).

1. accuracy: the 200 held-out problems of recipes/finetune/data/arithmetic-heldout.jsonl
   (English and Chinese), decoded greedily (24 new tokens), scored by the exact_answer reward,
   for the SFT warm start (recipe grpo-arithmetic-sft from --base) and for the same model after
   the grpo-arithmetic recipe; the GRPO run's held-out reward at each evaluation is the curve.
2. rollout throughput on the SFT model: --prompts prompts x --group samples of up to 24 tokens
   at temperature 1 (no top-k/top-p), lmforge's engine (the path GRPO's rollouts take) against
   transformers `generate(do_sample=True, num_return_sequences=G)` on the same weights, in
   alternating rounds; tokens/s counts the tokens each sequence generated up to and including
   its end-of-text token. Also a LoRA policy decoded merged vs unmerged (GRPO's
   grpo.rollout choice), and the share of GRPO's step time spent generating (its metrics).

    python benchmarks/grpo.py --base runs/quickstart/model                # SFT, GRPO, throughput
    python benchmarks/grpo.py --sft-model runs/grpo-arithmetic-sft/model --grpo-steps 60
    python benchmarks/grpo.py --sft-model M --grpo-run runs/grpo-arithmetic --skip-grpo   # measure only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import kernels_build, machine

import lmforge
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.train.finetune import RECIPES, finetune, load_finetune_config
from lmforge.train.rewards import exact_answer

HELD_OUT = RECIPES / "data" / "arithmetic-heldout.jsonl"
FRESH_SEED = 4  # the recipe's files use seeds 1-3 (lmforge.data.arithmetic)
MAX_NEW = 24


def held_out() -> list[dict]:
    return [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()]


def fresh_problems(n: int) -> list[dict]:
    """`n` more held-out problems, none of them in the recipe's SFT, GRPO or held-out files: 200
    problems put one answer at half a point, so a small difference needs more of them."""
    from lmforge.data.arithmetic import grpo_row, problems, recipe_files

    seen = {r["prompt"] for rows in recipe_files().values() for r in rows}
    fresh = [p for p in problems(n + len(seen), FRESH_SEED) if p.prompt not in seen][:n]
    return [grpo_row(p, i) for i, p in enumerate(fresh)]


def accuracy(model_dir: Path, rows: list[dict] | None = None) -> dict[str, float]:
    """Greedy exact-answer accuracy on `rows` (default: the recipe's held-out problems), overall and per language."""
    loaded = lmforge.load(model_dir)
    rows = rows or held_out()
    tok = loaded.tokenizer
    with Engine(loaded.model, tok, max_batch=64, max_queue=1 << 16) as engine:
        results = engine.generate([Request(tok.encode(r["prompt"]), SamplingParams(max_new_tokens=MAX_NEW))
                                   for r in rows])
    right = [exact_answer(r["prompt"], res.text, answer=r["answer"]) for r, res in zip(rows, results)]
    out = {"all": sum(right) / len(right)}
    for lang in ("en", "zh"):
        mine = [x for x, r in zip(right, rows) if r["lang"] == lang]
        out[lang] = sum(mine) / len(mine)
    out["example"] = results[0].text
    return out


def run_recipe(name: str, overrides: dict, log) -> Path:
    cfg = load_finetune_config(name, overrides)
    t = time.perf_counter()
    result = finetune(cfg, progress=False, log=log)
    log(f"{name}: {result.steps} steps in {time.perf_counter() - t:.0f} s -> {result.output}")
    return result.run_dir


def rollout_requests(tok, prompts: int, group: int, seed: int) -> list[Request]:
    rows = held_out()[:prompts]
    return [Request(tok.encode(r["prompt"]), SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0,
                                                            seed=seed * 1000 + i * group + j))
            for i, r in enumerate(rows) for j in range(group)]


def engine_round(model, tok, prompts: int, group: int, seed: int) -> tuple[int, float]:
    requests = rollout_requests(tok, prompts, group, seed)
    t = time.perf_counter()
    with Engine(model, tok, max_batch=len(requests), max_queue=1 << 16) as engine:
        results = engine.generate(requests)
    return sum(r.completion_tokens for r in results), time.perf_counter() - t


def hf_round(hf, tok, prompts: int, group: int, seed: int) -> tuple[int, float]:
    rows = held_out()[:prompts]
    ids = [tok.encode(r["prompt"]) for r in rows]
    width = max(map(len, ids))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=MAX_NEW, num_return_sequences=group, pad_token_id=pad,
                          eos_token_id=tok.eos_id)
    seconds = time.perf_counter() - t
    tokens = 0
    for row in out[:, width:].tolist():
        tokens += next((k + 1 for k, t_ in enumerate(row) if t_ == tok.eos_id), len(row))
    return tokens, seconds


def throughput(model_dir: Path, prompts: int, group: int, rounds: int) -> dict:
    import transformers

    loaded = lmforge.load(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ours, theirs = [], []
    for k in range(rounds + 1):  # round 0 warms both up
        a = engine_round(loaded.model, loaded.tokenizer, prompts, group, k)
        b = hf_round(hf, loaded.tokenizer, prompts, group, k)
        if k:
            ours.append(a[0] / a[1])
            theirs.append(b[0] / b[1])
    return {"engine_tok_s": statistics.median(ours), "hf_tok_s": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs), "rounds": rounds}


def lora_modes(model_dir: Path, prompts: int, group: int, rounds: int) -> dict:
    """Rollout tokens/s of a LoRA policy (random adapters, r 8, every block linear) decoded merged
    (refresh of the merged copy included) and unmerged."""
    from lmforge.adapters import apply_lora
    from lmforge.model.lora import LoraSettings, lora_layers
    from lmforge.train.grpo import Rollouts

    loaded = lmforge.load(model_dir)
    apply_lora(loaded.model, LoraSettings(r=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(loaded.model).values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    tok = loaded.tokenizer
    out = {}
    modes = {m: Rollouts(loaded.model, tok, m, prompts * group, [], lambda s: None) for m in ("merged", "unmerged")}
    speeds = {m: [] for m in modes}
    for k in range(rounds + 1):
        for m, rollouts in modes.items():
            reqs = rollout_requests(tok, prompts, group, k)
            t = time.perf_counter()
            results = rollouts.generate([r.prompt for r in reqs], [r.params for r in reqs])
            if k:
                speeds[m].append(sum(r.completion_tokens for r in results) / (time.perf_counter() - t))
    for m, v in speeds.items():
        out[f"{m}_tok_s"] = statistics.median(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/quickstart/model")
    p.add_argument("--sft-model", help="reuse this SFT warm start instead of training one")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--grpo-lr", type=float, default=None)
    p.add_argument("--grpo-run", help="reuse this GRPO run directory (with --skip-grpo)")
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--out", default="runs/bench-grpo")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--more-problems", type=int, default=0,
                   help="also score both models on this many fresh held-out problems (less noise than 200)")
    args = p.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    report = {"machine": machine(), "build": kernels_build()}
    out = Path(args.out)
    if args.sft_model:
        sft_model = Path(args.sft_model)
    else:
        sft_dir = run_recipe("grpo-arithmetic-sft", {"base": args.base, "train": {"max_steps": args.sft_steps},
                                                     "run": {"name": "sft", "out": str(out)}}, log)
        sft_model = sft_dir / "model"
    report["sft"] = accuracy(sft_model)
    log(f"SFT accuracy: {report['sft']}")
    if args.skip_grpo:
        grpo_dir = Path(args.grpo_run)
    else:
        over = {"base": str(sft_model), "train": {"max_steps": args.grpo_steps},
                "eval": {"every": max(1, args.grpo_steps // 4)}, "run": {"name": "grpo", "out": str(out)}}
        if args.grpo_lr:
            over["train"]["lr"] = args.grpo_lr
        t = time.perf_counter()
        grpo_dir = run_recipe("grpo-arithmetic", over, log)
        report["grpo_seconds"] = time.perf_counter() - t
    report["grpo"] = accuracy(grpo_dir / "model")
    log(f"SFT + GRPO accuracy: {report['grpo']}")
    if args.more_problems:
        fresh = fresh_problems(args.more_problems)
        report["fresh"] = {"problems": len(fresh), "sft": accuracy(sft_model, fresh),
                           "grpo": accuracy(grpo_dir / "model", fresh)}
        log(f"on {len(fresh)} fresh problems: SFT {report['fresh']['sft']}, SFT + GRPO {report['fresh']['grpo']}")
    records = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    report["curve"] = [(r["step"], r["val_reward"]) for r in records if "val_reward" in r]
    train = [r for r in records if "rollout_share" in r]
    report["rollout_share"] = statistics.mean(r["rollout_share"] for r in train)
    report["train_reward"] = [(r["step"], round(r["reward"], 3)) for r in train]
    report["throughput"] = throughput(sft_model, args.prompts, args.group, args.rounds)
    log(f"rollouts: {report['throughput']}")
    report["lora"] = lora_modes(sft_model, args.prompts, args.group, args.rounds)
    log(f"LoRA rollouts: {report['lora']}")
    report["build"] += f"; load at the end {kernels_build().rsplit('load average', 1)[-1]}"
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
