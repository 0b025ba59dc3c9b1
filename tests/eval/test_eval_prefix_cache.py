"""Scoring computes the prefixes that contexts share once (eval.scoring's prefix sharing):
same scores as without it, to float32 rounding, and fewer tokens through the model."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

import lmforge
import lmforge.eval.tasks as tasks_module
from lmforge.eval.scoring import MIN_SHARED, score_requests
from lmforge.eval.tasks import evaluate_task, load_task

# Sharing changes how many rows each matmul sees (and so which kernel, and the sums' order): a
# score summed over many tokens moves by fp32 rounding of its size, far below a wrong cache's error.
TOL, REL = 1e-5, 1e-6

EN = [
    {"context": "Question: Which planet is closest to the Sun?\nAnswer:", "choices": ["Mercury", "Venus", "Mars"],
     "gold": 0},
    {"context": "Question: What does HTTP stand for?\nAnswer:",
     "choices": ["HyperText Transfer Protocol", "High Transfer Text Process"], "gold": 0},
    {"context": "Question: Which gas do plants take in for photosynthesis?\nAnswer:",
     "choices": ["oxygen", "carbon dioxide", "nitrogen"], "gold": 1},
    {"context": "Question: How many bytes are in a kibibyte?\nAnswer:", "choices": ["1000", "1024", "512"],
     "gold": 1},
    {"context": "Question: Who wrote 'Pride and Prejudice'?\nAnswer:",
     "choices": ["Jane Austen", "Charlotte Brontë", "Mary Shelley"], "gold": 0},
    {"context": "Question: What is the boiling point of water at sea level in Celsius?\nAnswer:",
     "choices": ["90", "100", "110"], "gold": 1},
]
# C-Eval's layout: an instruction before each question.
ZH_INSTRUCTION = "以下是关于计算机与常识的单项选择题，请选出其中的正确答案。\n"
ZH = [
    {"context": f"{ZH_INSTRUCTION}问题：Transformer 模型中的 attention 用来做什么？答案：",
     "choices": ["计算词与词之间的相关性", "压缩图片", "管理内存"], "gold": 0},
    {"context": f"{ZH_INSTRUCTION}问题：Python 中的 list 是什么？答案：", "choices": ["可变序列", "不可变映射"], "gold": 0},
    {"context": f"{ZH_INSTRUCTION}问题：HTTP 状态码 404 表示什么？答案：", "choices": ["服务器错误", "未找到", "重定向"], "gold": 1},
    {"context": f"{ZH_INSTRUCTION}问题：GPU 的主要用途是什么？答案：", "choices": ["并行计算", "存储文件", "网络路由"], "gold": 0},
    {"context": f"{ZH_INSTRUCTION}问题：中国的首都是哪里？答案：", "choices": ["上海", "北京", "广州"], "gold": 1},
    {"context": f"{ZH_INSTRUCTION}问题：JSON 是一种什么格式？答案：", "choices": ["数据交换格式", "图片格式", "音频格式"], "gold": 0},
]


def count_tokens(model) -> list[int]:
    """A counter of the tokens the model's embedding sees (its forward passes' inputs)."""
    seen = [0]
    model.tok_emb.register_forward_pre_hook(lambda _, args: seen.__setitem__(0, seen[0] + args[0].numel()))
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefixes_score_as_without_sharing(make_model, family):
    model = make_model(family, context=128)
    g = torch.Generator().manual_seed(3)
    shots = torch.randint(0, 320, (40,), generator=g).tolist()  # the few-shot block every context starts with
    other = torch.randint(0, 320, (25,), generator=g).tolist()  # a second prefix, shared by fewer contexts
    contexts = [shots + torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 5, 9, 3, 12)]
    contexts += [other + torch.randint(0, 320, (n,), generator=g).tolist() for n in (2, 7)]
    contexts += [torch.randint(0, 320, (6,), generator=g).tolist()]  # shares nothing
    requests = [(c, torch.randint(0, 320, (m,), generator=g).tolist()) for c in contexts for m in (1, 3)]
    seen = count_tokens(model)
    off = score_requests(model, requests, batch_size=3, prefix_cache=False)
    fed_off, seen[0] = seen[0], 0
    on = score_requests(model, requests, batch_size=3, prefix_cache=True)
    for a, b in zip(on, off):
        assert a.logprob == pytest.approx(b.logprob, abs=TOL, rel=REL)
        assert a.greedy == b.greedy
    # The 40-token block is computed for two batches of the five contexts: once, then copied
    # from the prefix cache (whole 16-token blocks); the 25-token prefix once.
    assert fed_off - seen[0] >= (5 * 40 - 40 + 8) + (2 * 25 - 25)


def test_sliding_window_models_are_scored_without_sharing(make_model):
    model = make_model("mistral", sliding_window=8, context=128)
    shots = list(range(1, 2 * MIN_SHARED))
    requests = [(shots + [40 + i], [7, 8]) for i in range(4)]
    seen = count_tokens(model)
    off = score_requests(model, requests, prefix_cache=False)
    fed_off, seen[0] = seen[0], 0
    on = score_requests(model, requests, prefix_cache=True)
    assert [s.logprob for s in on] == [s.logprob for s in off] and seen[0] == fed_off


@pytest.mark.parametrize("rows", [EN, ZH], ids=["english", "chinese"])
def test_few_shot_multiple_choice_same_with_and_without_sharing(long_model_dir, tmp_path, monkeypatch, rows):
    lm = lmforge.load(long_model_dir)
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = load_task(path)
    seen = count_tokens(lm.model)
    on = evaluate_task(lm, task, num_fewshot=3, batch_size=4)
    fed_on, seen[0] = seen[0], 0
    monkeypatch.setattr(tasks_module, "score_requests", functools.partial(score_requests, prefix_cache=False))
    off = evaluate_task(lm, task, num_fewshot=3, batch_size=4)
    assert on.metrics == off.metrics
    for a, b in zip(on.predictions, off.predictions):
        assert a["prompt"] == b["prompt"] and a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=TOL, rel=REL)
    # Six examples, three shots drawn from five others: some contexts start with the same
    # shot (English), or all with the same instruction (Chinese).
    assert fed_on < seen[0]


def test_lm_eval_loglikelihood_same_with_and_without_sharing(long_model_dir):
    pytest.importorskip("lm_eval")
    from lmforge.eval.harness import LmforgeLM

    # MMLU's layout: the same five solved questions before every question of a subject.
    shots = "".join(f"{ex['context']} {ex['choices'][ex['gold']]}\n\n" for ex in EN[:5])
    requests = [SimpleNamespace(args=(shots + ex["context"], " " + c)) for ex in EN[5:] + ZH for c in ex["choices"]]
    requests.append(SimpleNamespace(args=("", "an unconditional string")))
    on, off = LmforgeLM(str(long_model_dir), batch_size=4), LmforgeLM(str(long_model_dir), prefix_cache="False")
    assert on.prefix_cache and not off.prefix_cache
    seen = count_tokens(off.lm.model)
    expected = off.loglikelihood(requests)
    fed_off = seen[0]
    seen = count_tokens(on.lm.model)
    got = on.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=TOL, rel=REL)
    assert fed_off - seen[0] >= 5 * len(on.lm.tokenizer.encode(shots.rstrip(" "))) // 2
