"""Eval scoring with and without computing shared prefixes once: a 5-shot multiple-choice task.

A random-weight model of serve_load.py's "small" shape (27M parameters) with the quickstart
tokenizer. Two layouts of the same questions (4 choices each):

- fixed shots: the same five solved questions before every question, as MMLU's five per
  subject through lm-eval (`LmforgeLM.loglikelihood`);
- fixed shots, letter answers: the same, with the choices listed in the question and
  scored as " A".." D" (MMLU's own format): one-token continuations need no step after
  the context, so no per-choice copy of its keys and values;
- sampled shots: `lmforge eval --tasks --num-fewshot 5`, five solved questions drawn per
  question, so contexts share little beyond an instruction line.

Each layout runs with the sharing on and off, taking turns per round (same process, same
model); medians. The scores are compared too (largest log-likelihood difference).

    python benchmarks/eval_prefix.py
    python benchmarks/eval_prefix.py --questions 64 --rounds 3
    python benchmarks/eval_prefix.py --layouts letters
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from common import machine
from serve_load import build_model

import lmforge.eval.tasks as tasks_module
from lmforge.eval.harness import LmforgeLM
from lmforge.eval.scoring import score_requests
from lmforge.eval.tasks import evaluate_task, load_task

INSTRUCTION = "The following are multiple choice questions about shipping and orders. Pick the right answer.\n"
ITEMS = ["order", "parcel", "invoice", "refund", "gift card", "e-book", "address", "coupon"]
CITIES = ["Lyon", "Berlin", "Osaka", "Toronto", "Lisbon", "Seoul", "Austin", "Milan"]


def questions(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        item, city = rng.choice(ITEMS), rng.choice(CITIES)
        days = rng.randint(2, 9)
        choices = [f"{days} days", f"{days + 3} days", f"{days * 2 + 1} days", "it cannot be shipped"]
        out.append({"context": f"{INSTRUCTION}Question {i}: how long does a {item} take to reach {city}?\nAnswer:",
                    "choices": choices, "gold": rng.randrange(4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layouts", nargs="+", default=["fixed", "letters", "sampled"],
                    choices=["fixed", "letters", "sampled"])
    args = ap.parse_args()
    print(machine())
    rows = questions(args.questions + 5)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), context=1024, shape="small")
        harness = LmforgeLM(str(model_dir), batch_size=args.batch_size)
        lm = harness.lm
        shots = "".join(f"{r['context']} {r['choices'][r['gold']]}\n\n" for r in rows[:5])
        fixed = [SimpleNamespace(args=(shots + r["context"], " " + c)) for r in rows[5:] for c in r["choices"]]
        def lettered(r: dict) -> str:
            listed = "".join(f"\n{'ABCD'[j]}. {c}" for j, c in enumerate(r["choices"]))
            return r["context"].removesuffix("\nAnswer:") + listed + "\nAnswer:"

        letter_shots = "".join(f"{lettered(r)} {'ABCD'[r['gold']]}\n\n" for r in rows[:5])
        letters = [SimpleNamespace(args=(letter_shots + lettered(r), " " + x)) for r in rows[5:] for x in "ABCD"]
        path = Path(tmp) / "shipping.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
        task = load_task(path)
        print(f"model: small ({lm.model.num_params() / 1e6:.0f}M parameters), {args.questions} questions x 4 choices, "
              f"fixed-shot contexts {len(lm.tokenizer.encode(fixed[0].args[0]))} tokens, batch {args.batch_size}")

        def fixed_run(on: bool, requests=fixed):
            harness.prefix_cache = on
            return [v for v, _ in harness.loglikelihood(requests)]

        def sampled_run(on: bool):
            tasks_module.score_requests = functools.partial(score_requests, prefix_cache=on)
            result = evaluate_task(lm, task, num_fewshot=5, batch_size=args.batch_size)
            return [v for p in result.predictions for v in p["loglikelihoods"]]

        layouts = {"fixed": ("fixed shots (lm-eval, MMLU layout)", fixed_run),
                   "letters": ("fixed shots, letter answers (MMLU's format)",
                               functools.partial(fixed_run, requests=letters)),
                   "sampled": ("sampled shots (lmforge eval --tasks)", sampled_run)}
        for name, run in (layouts[k] for k in args.layouts):
            run(True)  # warm-up
            times: dict[bool, list[float]] = {True: [], False: []}
            scores: dict[bool, list[float]] = {}
            for _ in range(args.rounds):
                for on in (True, False):
                    start = time.perf_counter()
                    scores[on] = run(on)
                    times[on].append(time.perf_counter() - start)
            t_on, t_off = statistics.median(times[True]), statistics.median(times[False])
            diff = max(abs(a - b) for a, b in zip(scores[True], scores[False]))
            print(f"{name}: sharing on {t_on:.2f} s, off {t_off:.2f} s: {t_off / t_on:.2f}x "
                  f"({args.questions / t_on:.1f} vs {args.questions / t_off:.1f} questions/s; "
                  f"largest log-likelihood difference {diff:.1e})")


if __name__ == "__main__":
    main()
