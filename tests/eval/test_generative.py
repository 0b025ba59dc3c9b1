"""Generation and code tasks: config line, delimiters, metrics, samples, chat prompts, per-example outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.eval import generation
from lmforge.eval.metrics import pass_at_k, score_texts
from lmforge.eval.task_file import TaskConfig, build_prompt, delimiter, load_task
from lmforge.eval.tasks import evaluate_task, run_tasks


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def full_sequence_logprob(model, ctx: list[int], cont: list[int]) -> float:
    logp = model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_delimiter_follows_the_script_at_the_end_of_the_context():
    plain = TaskConfig()
    assert delimiter("Q: 2 + 2 =\nA:", plain) == " "
    assert delimiter("问：中国的首都是哪里？答：", plain) == ""  # full-width colon
    assert delimiter("中国的首都是", plain) == ""
    assert delimiter("日本の首都は", plain) == ""
    assert delimiter("The answer is ", plain) == ""  # the context's own space is the delimiter
    assert delimiter("中国的首都是", TaskConfig(delimiter=" ")) == " "  # the file decides when it says so


def test_chinese_multiple_choice_puts_no_space_before_the_choice(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    rows = [{"context": "中国的首都是", "choices": ["北京", "上海"], "gold": 0},
            {"context": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}]
    result = evaluate_task(lm, load_task(write_jsonl(tmp_path / "mc.jsonl", rows)))
    for ex, pred, sep in zip(rows, result.predictions, ["", " "]):
        ctx = lm.tokenizer.encode(ex["context"])
        expected = [full_sequence_logprob(lm.model, ctx, lm.tokenizer.encode(sep + c)) for c in ex["choices"]]
        assert pred["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    # The space would change the scores: the tokenizer encodes " 北京" differently.
    assert lm.tokenizer.encode(" 北京") != lm.tokenizer.encode("北京")


def test_chinese_few_shot_generation_prompt(tmp_path):
    rows = [{"context": "问：1+1等于几？答：", "answer": "2"}, {"context": "问：2+3等于几？答：", "answer": "5"},
            {"context": "Q: 4 + 4 =\nA:", "answer": "8"}]
    task = load_task(write_jsonl(tmp_path / "qa.jsonl", rows))
    prompt = build_prompt(task, 2, num_fewshot=2, seed=3)
    assert prompt.split("\n\n") == ["问：1+1等于几？答：2", "问：2+3等于几？答：5", "Q: 4 + 4 =\nA:"] or \
        prompt.split("\n\n") == ["问：2+3等于几？答：5", "问：1+1等于几？答：2", "Q: 4 + 4 =\nA:"]


@pytest.mark.slow
def test_generation_metrics_and_per_example_rows(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    contexts = ["翻译成英文：你好", "Summarize: the cat sat on the mat", "a b"]
    outputs = lm.generate(contexts, max_new_tokens=12, stop=["\n"])
    # References: what the model says (a perfect score), a Chinese reference, and one it does not say.
    references = [outputs[0], ["今天天气很好", outputs[1] + " extra words"], "zzz qqq"]
    config = {"metric": ["exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"], "max_tokens": 12,
              "stop": "\n"}
    path = write_jsonl(tmp_path / "gen.jsonl",
                       [{"config": config}, *({"id": f"ex-{i}", "context": c, "answer": r}
                                              for i, (c, r) in enumerate(zip(contexts, references)))])
    report = run_tasks([tiny_model_dir], [path], examples_dir=tmp_path / "out")
    result = report["results"][str(tiny_model_dir)]["gen"]
    expected, per = score_texts(config["metric"], [o.strip() for o in outputs],
                                [[r] if isinstance(r, str) else r for r in references])
    for name, value in expected.items():
        assert result[name] == pytest.approx(value)
    assert result["metric_names"] == list(expected)
    rows = [json.loads(line) for line in (tmp_path / "out" / "gen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["output"] for r in rows] == outputs and [r["id"] for r in rows] == ["ex-0", "ex-1", "ex-2"]
    assert rows[1]["reference"] == references[1] and rows[0]["prompt"] == contexts[0]
    for row, scores in zip(rows, per):
        assert {k: row[k] for k in scores} == pytest.approx(scores)
    if outputs[0].strip():
        assert rows[0]["exact_match"] == 1.0 and rows[0]["bleu"] == pytest.approx(1.0)
    assert report["examples"] == {"gen": str(tmp_path / "out" / "gen.jsonl")}


def test_sampled_generation_is_seeded(tiny_model_dir, tmp_path):
    lm = lmforge.load(tiny_model_dir)
    path = write_jsonl(tmp_path / "s.jsonl", [{"config": {"n": 5, "temperature": 1.0, "max_tokens": 6, "seed": 7}},
                                              {"context": "a b", "answer": "c"}, {"context": "x y", "answer": "z"}])
    task = load_task(path)
    first = evaluate_task(lm, task, batch_size=2).predictions
    again = evaluate_task(lm, task, batch_size=5).predictions
    assert [p["output"] for p in first] == [p["output"] for p in again]  # whatever the batch size
    assert all(len(p["output"]) == 5 for p in first)
    assert len(set(first[0]["output"])) > 1  # samples, not five copies of the greedy output
    other = write_jsonl(tmp_path / "s2.jsonl", [{"config": {"n": 5, "temperature": 1.0, "max_tokens": 6, "seed": 8}},
                                                {"context": "a b", "answer": "c"}])
    assert evaluate_task(lm, load_task(other)).predictions[0]["output"] != first[0]["output"]


def test_chat_template_renders_turns(tiny_model_dir, tmp_path):
    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, chat_dir)
    cfg_path = chat_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}a:{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    rows = [{"config": {"chat": True, "max_tokens": 4}}, {"context": "好吗", "answer": "好"},
            {"context": "How?", "answer": "fine"}]
    task = load_task(write_jsonl(tmp_path / "chat.jsonl", rows))
    result = evaluate_task(lmforge.load(chat_dir), task, num_fewshot=1)
    assert result.predictions[0]["prompt"] == "u:How?\na:fine\nu:好吗\na:"
    del cfg["chat_template"]  # an imported model whose tokenizer has no template
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="has none; drop \"chat\""):
        evaluate_task(lmforge.load(chat_dir), task)


def test_code_task_pass_at_k_through_the_sandbox(tiny_model_dir, tmp_path, monkeypatch):
    problems = load_task("pycode").examples[:3]
    path = write_jsonl(tmp_path / "code.jsonl", [{"config": {"n": 4, "temperature": 0.8, "k": [1, 2], "timeout": 5}},
                                                 *problems])
    task = load_task(path)
    # Completions chosen per problem: 4, 1 and 0 of 4 samples correct (one of them loops forever).
    chosen = [[p["canonical_solution"]] * 4 for p in problems]
    chosen[1] = [problems[1]["canonical_solution"], "    return 0\n", "    while True:\n        pass\n", "    return (\n"]
    chosen[2] = ["    raise ValueError\n"] * 4
    monkeypatch.setattr(generation, "sample_all", lambda *a, **k: chosen)
    result = evaluate_task(lmforge.load(tiny_model_dir), task)
    assert [p["passed"] for p in result.predictions] == [4, 1, 0]
    assert result.predictions[1]["status"] == ["passed", "failed", "timeout", "failed"]
    assert "SyntaxError" in result.predictions[1]["error"][3]
    for k in (1, 2):
        assert result.metrics[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in (4, 1, 0)) / 3)


@pytest.mark.slow
def test_builtin_code_task_through_the_cli(cli, make_model, tokenizer, tmp_path):
    from lmforge.model_dir import save_model_dir

    # The problems' prompts are ~150 tokens: a model with room for them and a completion.
    model_dir = save_model_dir(make_model("llama", vocab_size=tokenizer.vocab_size, context=512), tokenizer,
                               tmp_path / "coder")
    proc = cli("eval", model_dir, "--tasks", "pycode", "--limit", "2", "--out", "results.json")
    assert proc.returncode == 0, proc.stderr
    assert "pass@1" in proc.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= report["results"][str(model_dir)]["pycode"]["pass@1"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "results.examples" / "pycode.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == "pycode/0" and rows[0]["status"][0] in ("passed", "failed", "timeout")
    assert rows[0]["prompt"].startswith("def count_vowels")


@pytest.mark.parametrize("config, message", [
    ({"metrics": ["bleu"]}, "config metrics: Extra inputs are not permitted"),
    ({"metric": ["meteor"]}, "unknown metric 'meteor'"),
    ({"n": 4}, "n=4 samples need a temperature > 0"),
    ({"k": [1]}, "k does not apply to a generation task"),
    ({"max_tokens": 0}, "config max_tokens: Input should be greater than or equal to 1"),
])
def test_bad_config_lines_name_the_problem(tmp_path, config, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"config": config}, {"context": "x", "answer": "y"}])
    with pytest.raises(LmforgeError, match=message) as e:
        load_task(path)
    assert "bad.jsonl:1" in str(e.value)


def test_config_must_come_first_and_fit_the_type(tmp_path):
    late = write_jsonl(tmp_path / "late.jsonl", [{"context": "x", "answer": "y"}, {"config": {}}])
    with pytest.raises(LmforgeError, match="late.jsonl:2: the config line must be the file's first line"):
        load_task(late)
    code = write_jsonl(tmp_path / "c.jsonl", [{"config": {"n": 2, "temperature": 1, "k": [5]}},
                                              load_task("pycode").examples[0]])
    with pytest.raises(LmforgeError, match="pass@5 needs k between 1 and n=2"):
        load_task(code)
    with pytest.raises(LmforgeError, match=r"not found \(built-in tasks: .*pycode.*translate-eval"):
        load_task(tmp_path / "nothing.jsonl")


def test_harness_sampling_repeats_under_lm_eval_seed(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lmforge.eval.harness import LmforgeLM

    lm = LmforgeLM(pretrained=str(tiny_model_dir), batch_size="4")
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    reqs = [Instance("generate_until", {}, ("a b", kwargs), i) for i in range(4)]
    torch.manual_seed(11)
    first = lm.generate_until(reqs)
    torch.manual_seed(11)
    assert lm.generate_until(reqs) == first
    assert len(set(first)) > 1  # sampled, not greedy
    chat = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in chat and lm.chat
