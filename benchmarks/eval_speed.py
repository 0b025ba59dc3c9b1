"""Multiple-choice log-likelihood scoring: lmforge against lm-eval's own HF backend.

One random Llama-shaped `transformers` model is saved to a directory with a byte-level BPE
tokenizer; lmforge loads that directory (HF import) and lm-eval's `hf` backend loads it
with `transformers`. A task file of multiple-choice questions (a few-shot-sized context and
4 choices each) becomes the same lm-eval `loglikelihood` requests for both backends, at
the same batch size; we time `loglikelihood(requests)` alone, alternating rounds, and
report examples (questions) per second. lmforge batches distinct contexts and computes
each context once for all its choices (KV-cache prefix reuse); the HF backend scores
every (context + choice) sequence in full. Also shown: `lmforge eval --tasks` on the
same file (our native path, tokenization included) and the largest log-likelihood gap.

    python benchmarks/eval_speed.py                   # 64 questions, ~300-token contexts
    python benchmarks/eval_speed.py --questions 16 --rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from common import interleaved, machine

WORDS = ("the of and to in is was for on that with as by at from his her they it an be this are or had "
         "river mountain city king queen ship storm letter garden winter morning silver ancient quiet").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_task(path: Path, questions: int, context_words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(questions):
            context = " ".join(sentence(rng, 12) for _ in range(context_words // 12)) + " Answer:"
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(4)]
            f.write(json.dumps({"context": context, "choices": choices, "gold": rng.randrange(4)}) + "\n")


def build_model(directory: Path, layers: int, d_model: int, vocab: int) -> None:
    import transformers

    from lmforge.data.tokenizer import train_tokenizer

    rng = random.Random(1)
    tokenizer = train_tokenizer([sentence(rng, 30) for _ in range(3000)], vocab_size=vocab, min_frequency=1)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=d_model, intermediate_size=d_model * 8 // 3 // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=d_model // 64, num_key_value_heads=max(1, d_model // 128),
                                   max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    tokenizer.save(directory, model_max_length=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--context-words", type=int, default=240, help="words of context per question")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # lm-eval's per-call info lines

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import lmforge
    from lmforge.eval.harness import LmforgeLM
    from lmforge.eval.tasks import evaluate_task, load_task

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, task_path = Path(tmp) / "model", Path(tmp) / "mc.jsonl"
        build_model(model_dir, args.layers, args.d_model, args.vocab)
        write_task(task_path, args.questions, args.context_words)
        task = load_task(task_path)
        requests = [Instance("loglikelihood", ex, (ex["context"], " " + c), i)
                    for i, ex in enumerate(task.examples) for c in ex["choices"]]
        theirs = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device=args.device, dtype="float32")
        ours = LmforgeLM(pretrained=str(model_dir), batch_size=args.batch_size, device=args.device)
        native = lmforge.load(model_dir, device=args.device)
        ctx_tokens = sum(len(native.tokenizer.encode(ex["context"])) for ex in task.examples) / len(task.examples)

        answers = {}

        def rate(name, fn):
            def run() -> float:
                t = time.perf_counter()
                answers[name] = fn()
                return len(task.examples) / (time.perf_counter() - t)
            return run

        rates = interleaved({
            "lm-eval hf": rate("lm-eval hf", lambda: theirs.loglikelihood(requests, disable_tqdm=True)),
            "lmforge (lm-eval backend)": rate("lmforge", lambda: ours.loglikelihood(requests)),
            "lmforge eval --tasks": rate("native", lambda: evaluate_task(native, task, batch_size=args.batch_size)),
        }, args.rounds)
        gap = max(abs(a[0] - b[0]) for a, b in zip(answers["lm-eval hf"], answers["lmforge"]))

    print(f"# eval_speed: {machine()}")
    print(f"model: random Llama {args.layers} layers x {args.d_model}, vocab {args.vocab}; {args.questions} questions x 4 "
          f"choices, {ctx_tokens:.0f}-token contexts; batch size {args.batch_size}; device {args.device}; "
          f"median of {args.rounds} rounds")
    base = rates["lm-eval hf"]
    for name, r in rates.items():
        print(f"{name:28s} {r:8.1f} examples/s   {r / base:5.2f}x")
    print(f"largest log-likelihood difference, lmforge vs lm-eval hf: {gap:.2e} nats")


if __name__ == "__main__":
    main()
