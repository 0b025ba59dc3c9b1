"""Generation and code tasks: prompt, decode (greedy, or n seeded samples), score.

A generation example's prompt is its context (after any few-shot examples), or, with the
file's `"chat": true`, the model's chat template rendered with the few-shot examples as
earlier user/assistant turns and the context as the last user turn; decoding then also
stops at the template's end-of-turn token. Outputs are cut at the first stop string and
scored against the references with metrics.py.

A code example (HumanEval's fields: `prompt`, `test`, `entry_point`) is completed from its
prompt; each completion runs in the sandbox as `prompt + completion + test +
check(entry_point)`, and passes when that exits cleanly in time. pass@k uses the n samples.
"""

from __future__ import annotations

import time
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import pass_at_k, score_texts
from lmforge.eval.sandbox import run_many
from lmforge.eval.scoring import fit_context
from lmforge.eval.task_file import CODE_STOP, Task, TaskResult, answer_of, build_prompt, context_of
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

SAMPLE_BATCH = 16  # rows per decoding batch when sampling; part of what the seed reproduces


def chat_prompt(lm, task: Task, index: int, num_fewshot: int, seed: int) -> str:
    if lm.tokenizer.chat_template is None:
        raise LmforgeError(f"task {task.name} asks for the chat template (\"chat\": true), but {lm.path} has none; "
                           "drop \"chat\" from the task's config")
    messages = []
    for shot in task.shots(index, num_fewshot, seed):
        messages += [{"role": "user", "content": context_of(shot, task.type)},
                     {"role": "assistant", "content": answer_of(shot, task.type)}]
    messages.append({"role": "user", "content": context_of(task.examples[index], task.type)})
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def sample_all(lm, task: Task, prompts: list[str], batch_size: int, seed: int, stop: list[str],
                max_tokens: int) -> list[list[str]]:
    """n outputs per prompt. Greedy prompts share batches of `batch_size`; a sampled example draws
    its n samples in batches of SAMPLE_BATCH rows, each from a generator seeded by (seed, example,
    batch), so a run repeats whatever `batch_size` is."""
    from lmforge.data.chat_template import end_of_turn_ids

    lm.check_generates()
    config = task.config
    ids = []
    for i, p in enumerate(prompts):
        ids.append(lm.tokenizer.encode(p))
        fit_context(ids[-1], [0], lm.config.context, truncate=False,
                    what=f"task {task.name}, example {i + 1} (prompt + 1 token)")
    turn_end = end_of_turn_ids(lm.tokenizer) if config.chat else []

    def run(rows: list[list[int]], sample_seed: int | None) -> list[str]:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=config.temperature, top_p=config.top_p,
                                stop=stop, seed=sample_seed)
        return [c.text for c in generate(lm.model, lm.tokenizer, rows, params, stop_token_ids=turn_end)]

    if config.n == 1 and config.temperature == 0:
        texts: list[str] = []
        for b in range(0, len(ids), batch_size):
            texts += run(ids[b:b + batch_size], 0)
        return [[t] for t in texts]
    base = config.seed if config.seed is not None else seed
    outputs = []
    for i, row in enumerate(ids):
        samples: list[str] = []
        for b in range(0, config.n, SAMPLE_BATCH):
            rows = min(SAMPLE_BATCH, config.n - b)
            samples += run([row] * rows, (base * 1_000_003 + i * 1_009 + b) % (1 << 63))
        outputs.append(samples)
    return outputs


def task_prompts(lm, task: Task, num_fewshot: int, seed: int) -> list[str]:
    make = chat_prompt if task.config.chat else (lambda _lm, *a: build_prompt(*a))
    return [make(lm, task, i, num_fewshot, seed) for i in range(len(task.examples))]


def example_id(example: dict[str, Any], index: int) -> Any:
    return example.get("task_id", example.get("id", index))


def evaluate_generation(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, seed: int = 1234) -> TaskResult:
    config = task.config
    metrics = config.metric or ["exact_match"]
    prompts = task_prompts(lm, task, num_fewshot, seed)
    start = time.perf_counter()
    outputs = sample_all(lm, task, prompts, batch_size, seed, config.stop if config.stop is not None else ["\n"],
                          config.max_tokens or 32)
    seconds = time.perf_counter() - start
    references = [ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]] for ex in task.examples]
    # Every sample is a prediction of its example's references; an example's score is its samples' mean.
    flat = [(i, text.strip()) for i, texts in enumerate(outputs) for text in texts]
    totals, per_sample = score_texts(metrics, [t for _, t in flat], [references[i] for i, _ in flat])
    predictions = []
    for i, ex in enumerate(task.examples):
        scores = [s for (j, _), s in zip(flat, per_sample) if j == i]
        mean = {m: sum(s[m] for s in scores) / len(scores) for m in scores[0]}
        out = outputs[i][0] if config.n == 1 else outputs[i]
        predictions.append({"index": i, "id": example_id(ex, i), "prompt": prompts[i], "output": out,
                            "reference": ex["answer"], **mean})
    return TaskResult(task.name, task.type, len(task.examples), num_fewshot, totals, seconds, predictions)


def program(example: dict[str, Any], completion: str) -> str:
    """The file the sandbox runs: the prompt, the model's completion, the tests, the check call."""
    return f"{example['prompt']}{completion}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"


def evaluate_code(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, seed: int = 1234) -> TaskResult:
    config = task.config
    ks = config.k or [k for k in (1, 10, 100) if k <= config.n]
    prompts = task_prompts(lm, task, num_fewshot, seed)
    start = time.perf_counter()
    outputs = sample_all(lm, task, prompts, batch_size, seed, config.stop if config.stop is not None else CODE_STOP,
                          config.max_tokens or 256)
    programs = [program(ex, text) for ex, texts in zip(task.examples, outputs) for text in texts]
    results = run_many(programs, timeout=config.timeout)
    seconds = time.perf_counter() - start
    predictions, totals = [], {f"pass@{k}": 0.0 for k in ks}
    for i, ex in enumerate(task.examples):
        runs = results[i * config.n:(i + 1) * config.n]
        passed = sum(r.passed for r in runs)
        scores = {f"pass@{k}": pass_at_k(config.n, passed, k) for k in ks}
        for name, v in scores.items():
            totals[name] += v / len(task.examples)
        out = outputs[i][0] if config.n == 1 else outputs[i]
        predictions.append({"index": i, "id": example_id(ex, i), "prompt": prompts[i], "output": out,
                            "reference": ex.get("canonical_solution"), "passed": passed, "samples": config.n,
                            "status": [r.status for r in runs],
                            "error": [r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "" for r in runs],
                            **scores})
    return TaskResult(task.name, task.type, len(task.examples), num_fewshot, totals, seconds, predictions)
