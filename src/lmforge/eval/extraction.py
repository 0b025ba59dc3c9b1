"""Extraction tasks: a model writes the (head, relation, tail) triples of a text as JSON.

An example is a `context` (the text and the instruction, e.g. `...\\nTriples:`) and its gold
`triples`. The model's output is read leniently (`triples.parse_triples`: the first JSON array)
and scored by triple precision, recall and F1 (`triples.score`); `parsed` is the fraction of
outputs that held a JSON array at all.

With `"constrained": true` in the file's config, decoding runs through the serving engine
under the grammar of `triples.SCHEMA` (llguidance, as the server's structured outputs), so
every output that ends within `max_tokens` is a JSON array of triple objects. An output cut
by `max_tokens` cannot be closed and is counted in `truncated`; the schema bounds the
triples and their strings so that a generous `max_tokens` leaves none.
"""

from __future__ import annotations

import time

from lmforge.eval import triples
from lmforge.eval.generation import sample_all  # the seeded decoding of generation tasks
from lmforge.eval.generation import example_id, task_prompts
from lmforge.eval.scoring import fit_context
from lmforge.eval.task_file import Task, TaskResult

DEFAULT_MAX_TOKENS = 96


def schema_grammar() -> str:
    import llguidance

    # Compact JSON: a small model given the freedom of whitespace spends its tokens on it.
    return llguidance.LLMatcher.grammar_from_json_schema(triples.SCHEMA, defaults={"whitespace_flexible": False})


def constrained_outputs(lm, prompts: list[str], *, max_tokens: int, n: int = 1, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, chat: bool = False, batch_size: int = 16,
                        what: str = "extraction") -> list[list[tuple[str, str]]]:
    """n (text, finish reason) per prompt, decoded by the engine under the triples schema.
    Sample j of prompt i draws from a generator seeded by (seed, i, j)."""
    from lmforge.data.chat_template import end_of_turn_ids
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingParams

    lm.check_generates()
    grammar = schema_grammar()
    turn_end = end_of_turn_ids(lm.tokenizer) if chat else []
    requests = []
    for i, p in enumerate(prompts):
        ids = lm.tokenizer.encode(p)
        fit_context(ids, [0], lm.config.context, truncate=False, what=f"{what}, example {i + 1} (prompt + 1 token)")
        for j in range(n):
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seed=(seed * 1_000_003 + i * 1_009 + j) % (1 << 63))
            requests.append(Request(ids, params, stop_token_ids=turn_end, grammar=grammar))
    with Engine(lm.model, lm.tokenizer, max_batch=max(1, min(batch_size, len(requests)))) as engine:
        results = engine.generate(requests)
    pairs = [(r.text, r.finish_reason) for r in results]
    return [pairs[i * n:(i + 1) * n] for i in range(len(prompts))]


def evaluate_extraction(lm, task: Task, num_fewshot: int = 0, batch_size: int = 16, seed: int = 1234) -> TaskResult:
    config = task.config
    prompts = task_prompts(lm, task, num_fewshot, seed)
    max_tokens = config.max_tokens or DEFAULT_MAX_TOKENS
    start = time.perf_counter()
    if config.constrained:
        decoded = constrained_outputs(lm, prompts, max_tokens=max_tokens, n=config.n, temperature=config.temperature,
                                      top_p=config.top_p, seed=config.seed if config.seed is not None else seed,
                                      chat=config.chat, batch_size=batch_size, what=f"task {task.name}")
        outputs = [[text for text, _ in samples] for samples in decoded]
        truncated = [sum(reason == "length" for _, reason in samples) for samples in decoded]
    else:
        outputs = sample_all(lm, task, prompts, batch_size, seed, config.stop if config.stop is not None else ["\n"],
                             max_tokens)
        truncated = None
    seconds = time.perf_counter() - start
    gold = [[triples.as_triple(t) for t in ex["triples"]] for ex in task.examples]
    flat = [(i, text) for i, texts in enumerate(outputs) for text in texts]
    parsed = [triples.parse_triples(text) for _, text in flat]
    totals, per_sample = triples.score(parsed, [gold[i] for i, _ in flat])
    if truncated is not None:
        totals["truncated"] = sum(truncated) / max(len(flat), 1)
    predictions = []
    for i, ex in enumerate(task.examples):
        rows = [k for k, (j, _) in enumerate(flat) if j == i]
        mean = {m: sum(per_sample[k][m] for k in rows) / len(rows) for m in per_sample[rows[0]]}
        found = [[dict(zip(triples.FIELDS, t)) for t in parsed[k] or []] for k in rows]
        predictions.append({"index": i, "id": example_id(ex, i), "prompt": prompts[i],
                            "output": outputs[i][0] if config.n == 1 else outputs[i],
                            "triples": found[0] if config.n == 1 else found, "reference": ex["triples"], **mean})
    return TaskResult(task.name, task.type, len(task.examples), num_fewshot, totals, seconds, predictions)
