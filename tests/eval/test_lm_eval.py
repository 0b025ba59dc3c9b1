"""The lm-eval-harness backend runs local tasks through lm-eval's own Python API."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

import lmforge  # noqa: E402
from lmforge.eval.harness import LmforgeLM  # noqa: E402  (registers --model lmforge)
from lmforge.eval.scoring import rolling_logprob  # noqa: E402
from lmforge.eval.tasks import evaluate_task, load_task  # noqa: E402

MC = [
    {"context": "The cat sat on the", "choices": ["mat", "dog barked loudly", "moon"], "gold": 0},
    {"context": "One, two,", "choices": ["three", "four five"], "gold": 1},
    {"context": "Water is", "choices": ["wet", "dry", "a liquid at room temperature"], "gold": 2},
    {"context": "Hello", "choices": ["world", "there"], "gold": 1},
]
GEN = [{"question": "a b", "answer": "c"}, {"question": "x y", "answer": "z"}]


def local_task(name, path, cache, **fields):
    """A task config for a local JSONL file: the `json` dataset builder reads it, nothing is downloaded."""
    return {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(cache)}, **fields}


@pytest.mark.slow
def test_simple_evaluate_runs_local_tasks_through_the_lmforge_backend(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mc_path, gen_path = tmp_path / "mc.jsonl", tmp_path / "gen.jsonl"
    mc_path.write_text("".join(json.dumps(r) + "\n" for r in MC))
    gen_path.write_text("".join(json.dumps(r) + "\n" for r in GEN))
    tasks = [
        local_task("local_mc", mc_path, tmp_path / "hf", output_type="multiple_choice", doc_to_text="{{context}}",
                   doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
                   metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        local_task("local_gen", gen_path, tmp_path / "hf", output_type="generate_until", doc_to_text="{{question}}",
                   doc_to_target="{{answer}}", generation_kwargs={"until": ["\n"], "max_gen_toks": 5},
                   metric_list=[{"metric": "exact_match"}]),
    ]
    out = lm_eval.simple_evaluate(model="lmforge", model_args=f"pretrained={tiny_model_dir},batch_size=3",
                                  tasks=tasks, task_manager=lm_eval.tasks.TaskManager(include_defaults=False), bootstrap_iters=0,
                                  log_samples=True)
    ours = evaluate_task(lmforge.load(tiny_model_dir), load_task(mc_path))
    assert out["results"]["local_mc"]["acc,none"] == ours.metrics["acc"]
    # lm-eval normalizes by characters, we by UTF-8 bytes: the same for this ASCII file.
    assert out["results"]["local_mc"]["acc_norm,none"] == ours.metrics["acc_norm"]
    for sample, pred in zip(sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"]), ours.predictions):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(pred["loglikelihoods"], abs=1e-4)
    assert 0.0 <= out["results"]["local_gen"]["exact_match,none"] <= 1.0
    assert len(out["samples"]["local_gen"]) == 2


def test_loglikelihood_rolling_and_generate_until(tiny_model_dir):
    from lm_eval.api.instance import Instance

    lm = LmforgeLM(pretrained=str(tiny_model_dir), batch_size="2")
    text = "hello world " * 40  # longer than the 64-token context: several windows
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.lm.tokenizer.encode(text)
    assert len(ids) > lm.lm.config.context
    assert got == pytest.approx(rolling_logprob(lm.lm.model, ids, lm.lm.tokenizer.eos_id))
    prompts = ["a b", "c d e"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 4}), i) for i, p in enumerate(prompts)]
    assert lm.generate_until(reqs) == lmforge.load(tiny_model_dir).generate(prompts, max_new_tokens=4, stop=["\n"])
    # An over-long context keeps its newest tokens, as lm-eval's HF backend does.
    (score,) = lm.loglikelihood([Instance("loglikelihood", {}, ("word " * 300, "end"), 0)])
    assert score[0] < 0
