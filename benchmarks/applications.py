"""The six application recipes before and after fine-tuning (issue 22).

For each recipe (translate, summarize, code-completion, relation-extraction, sentiment,
support-chat): evaluate --base on the recipe's held-out task file
(recipes/finetune/data/NAME-eval.jsonl), fine-tune the recipe from --base (its own steps
unless --steps), evaluate the fine-tuned model, print a before/after table and write the
numbers as JSON (--json-out).

    python benchmarks/applications.py --base runs/quickstart/model --out runs/apps
    python benchmarks/applications.py --base M --only translate --only sentiment --steps 20 --threads 1

The sentiment recipe trains a classification head: its "before" is the base model choosing
between the label words (multiple choice), its "after" the head's predictions; both are
accuracy and macro-F1 on the same held-out reviews.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import kernels_build, machine

from lmforge.applications import APPLICATIONS, before_after, before_after_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("runs/quickstart/model"))
    ap.add_argument("--out", type=Path, default=Path("runs/applications"), help="where the fine-tuning runs go")
    ap.add_argument("--only", action="append", choices=APPLICATIONS, help="run these recipes only (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: each recipe's own)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out examples")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a crowded machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(kernels_build())
    start = time.perf_counter()
    overrides = ["--train.device=cpu"]
    if args.steps is not None:
        overrides += [f"--train.max_steps={args.steps}", f"--train.checkpoint_every={args.steps}",
                      f"--eval.every={args.steps}"]
    rows = [before_after(name, args.base, args.out, overrides, args.limit) for name in args.only or APPLICATIONS]
    print(before_after_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s; {kernels_build()}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine(), "base": str(args.base), "rows": rows}, indent=1,
                                            ensure_ascii=False))


if __name__ == "__main__":
    main()
