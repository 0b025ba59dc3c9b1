"""Multiple-choice, generation and perplexity tasks from JSONL, against hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.eval.scoring import score_requests
from lmforge.eval.tasks import build_prompt, evaluate_task, load_task, run_tasks

MC = [
    {"context": "The cat sat on the", "choices": ["mat", "dog barked loudly", "moon"], "gold": 0},
    {"context": "One, two,", "choices": ["three", "four five"], "gold": "four five"},
    {"context": "Water is", "choices": ["wet", "dry", "a liquid at room temperature"], "gold": 2},
    {"context": "Hello", "choices": ["world", "there"], "gold": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def full_sequence_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log P(cont | ctx) from one plain forward pass over ctx + cont, no cache, no batching."""
    ids = torch.tensor([ctx + cont])
    logp = model(ids)[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_shared_prefix_batched_scores_equal_full_sequences(make_model, family):
    model = make_model(family, sliding_window=8) if family == "mistral" else make_model(family)
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 11, 7)]
    requests = [(c, torch.randint(0, 320, (m,), generator=g).tolist()) for c in contexts for m in (1, 4, 6)]
    scores = score_requests(model, requests, batch_size=2)
    for (ctx, cont), s in zip(requests, scores):
        assert s.logprob == pytest.approx(full_sequence_logprob(model, ctx, cont), abs=1e-4)


def test_multiple_choice_accuracy_matches_hand_computation(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", MC))
    result = evaluate_task(lm, task, batch_size=3)
    acc = acc_norm = 0
    for ex, pred in zip(task.examples, result.predictions):
        ctx = lm.tokenizer.encode(ex["context"])
        ll = [full_sequence_logprob(lm.model, ctx, lm.tokenizer.encode(" " + c)) for c in ex["choices"]]
        assert pred["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
        norm = [v / len(c.encode()) for v, c in zip(ll, ex["choices"])]
        acc += ll.index(max(ll)) == ex["gold"]
        acc_norm += norm.index(max(norm)) == ex["gold"]
    assert result.metrics == {"acc": acc / 4, "acc_norm": acc_norm / 4}
    assert task.examples[1]["gold"] == 1  # a gold given as the choice's text becomes its index


def test_few_shot_prompt_is_other_solved_examples(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", MC))
    prompt = build_prompt(task, 0, num_fewshot=2, seed=7)
    *shots, last = prompt.split("\n\n")
    assert last == MC[0]["context"] and len(shots) == 2
    solved = {ex["context"] + " " + ex["choices"][ex["gold"] if isinstance(ex["gold"], int) else 1] for ex in MC[1:]}
    assert set(shots) <= solved
    assert build_prompt(task, 0, 2, seed=7) == prompt  # deterministic


def test_generation_exact_match_and_perplexity(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    # The model is random: make the answers what it greedily says, and one that it does not.
    outputs = lm.generate(["a b", "c d"], max_new_tokens=32, stop=["\n"])  # the task defaults
    rows = [{"context": "a b", "answer": outputs[0]}, {"context": "c d", "answer": [outputs[1] + "zzz", "qq"]}]
    result = evaluate_task(lm, load_task(write_jsonl(tmp_path / "gen.jsonl", rows)))
    if outputs[0].strip():
        assert result.metrics["exact_match"] == 0.5
    text = "the quick brown fox jumps over the lazy dog"
    ppl = evaluate_task(lm, load_task(write_jsonl(tmp_path / "ppl.jsonl", [{"text": text}]))).metrics
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    assert len(ids) <= lm.config.context  # one window: a plain forward pass is the hand count
    nll = -full_sequence_logprob(lm.model, ids[:1], ids[1:])
    assert ppl["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)
    assert ppl["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)


@pytest.mark.parametrize("row, message", [
    ({"context": "x", "choices": ["a", "b"]}, "missing field 'gold'"),
    ({"choices": ["a", "b"], "gold": 0}, "missing field 'context'"),
    ({"context": "x", "choices": ["a", "b"], "gold": 2}, "gold 2 is outside the choices"),
    ({"context": "x", "choices": ["a", "b"], "gold": "c"}, "gold 'c' is not one of the choices"),
    ({"context": "x", "choices": ["a"], "gold": 0}, "at least 2"),
    ({"context": "x"}, "cannot tell the task type"),
])
def test_bad_task_files_name_the_problem(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC[0], row])
    with pytest.raises(LmforgeError, match=message) as e:
        load_task(path)
    assert "bad.jsonl:2" in str(e.value)


def test_prompt_longer_than_context_is_an_error(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    row = {"context": "word " * 200, "choices": ["a", "b"], "gold": 0}
    task = load_task(write_jsonl(tmp_path / "long.jsonl", [row]))
    with pytest.raises(LmforgeError, match=r"task long, example 1 is \d+ tokens long .* context of 64"):
        evaluate_task(lm, task)


@pytest.mark.slow
def test_cli_tasks_compare_writes_json_and_table(cli, tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC)
    write_jsonl(tmp_path / "ppl.jsonl", [{"text": "hello world, hello there"}])
    proc = cli("eval", tiny_model_dir, "--tasks", "mc.jsonl", "--tasks", "ppl.jsonl", "--compare", tiny_model_dir,
               "--num-fewshot", "1", "--out", "results.json")
    assert proc.returncode == 0, proc.stderr
    assert "acc_norm" in proc.stdout and "bits_per_byte" in proc.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["num_fewshot"] == 1 and len(report["models"]) == 2
    assert set(report["results"][str(tiny_model_dir)]) == {"mc", "ppl"}
    bad = cli("eval", tiny_model_dir, "--tasks", "missing.jsonl")
    assert bad.returncode == 2 and "task file missing.jsonl not found" in bad.stderr
    neither = cli("eval", tiny_model_dir)
    assert neither.returncode == 2 and "--data" in neither.stderr


def test_run_tasks_rejects_duplicate_names(tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    p1, p2 = write_jsonl(tmp_path / "mc.jsonl", MC), write_jsonl(tmp_path / "a" / "mc.jsonl", MC)
    with pytest.raises(LmforgeError, match="share a name"):
        run_tasks([tiny_model_dir], [p1, p2])


def test_logit_budget_splits_batches_without_changing_scores(make_model):
    model = make_model("llama")
    requests = [([1, 2, 3 + i], [4, 5, 6]) for i in range(6)] + [([7], [8])]
    whole = score_requests(model, requests, batch_size=16)
    split = score_requests(model, requests, batch_size=16, max_logits=3 * 320 * 2)  # two contexts' rows at a time
    assert [s.logprob for s in split] == pytest.approx([s.logprob for s in whole], abs=1e-5)
