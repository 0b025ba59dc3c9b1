"""GRPO: advantages and the clipped loss against hand computations, the KL term, the built-in
rewards, rollouts on the policy's current weights (LoRA merged = unmerged), resume, and both
full and LoRA policies learning a simple reward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import randomize_adapters, random_model, save_random_model, small_tokenizer, write_jsonl

from lmforge.adapters import apply_lora
from lmforge.config import deep_merge
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.infer.sampling import SamplingParams
from lmforge.model.lora import LoraSettings
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.grpo import Rollouts, adapters_disabled, group_advantages, policy_loss, token_logps
from lmforge.train.grpo_settings import RewardSpec
from lmforge.train.rewards import build_rewards, code_tests, exact_answer, json_schema, regex

# ----------------------------------------------------------------------------- arithmetic


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    std1 = math.sqrt((4 * 0.25) / 3)  # sample standard deviation of 1, 0, 0, 1
    std3 = math.sqrt((1 + 1 + 0 + 0) / 3)
    expected = [[0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4)],
                [0.0] * 4,  # a group whose completions all score alike teaches nothing
                [1 / (std3 + 1e-4), -1 / (std3 + 1e-4), 0.0, 0.0]]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    centered = group_advantages(rewards, scale=False)  # Dr. GRPO
    assert torch.allclose(centered[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def _hand_batch():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]])
    old = torch.tensor([[-1.2, -0.5, -1.0], [-0.3, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    return logp, old, mask, adv


def _hand_token_losses(eps=0.2):
    """-min(r A, clip(r) A) per unmasked token, written out one by one."""
    r = [[math.exp(0.2), 1.0, math.exp(-1.0)], [1.0, math.exp(0.3)]]
    a = [1.0, -2.0]
    out, clipped = [], 0
    for row, ratios in enumerate(r):
        losses = []
        for ratio in ratios:
            unclipped = ratio * a[row]
            clip = min(max(ratio, 1 - eps), 1 + eps) * a[row]
            losses.append(-min(unclipped, clip))
            clipped += clip < unclipped
        out.append(losses)
    return out, clipped


def test_policy_loss_by_hand():
    logp, old, mask, adv = _hand_batch()
    per_row, clipped = _hand_token_losses()
    tokens = [t for row in per_row for t in row]
    parts = policy_loss(logp, old, adv, mask, epsilon=0.2)
    assert parts.loss.item() == pytest.approx(sum(tokens) / 5, abs=1e-6)  # token mean (DAPO)
    assert parts.loss.item() == pytest.approx((-1.2 - 1 - math.exp(-1) + 2 + 2 * math.exp(0.3)) / 5, abs=1e-6)
    assert parts.clip_fraction == pytest.approx(clipped / 5) and clipped == 1  # row 0, token 0: 1.22 -> 1.2
    assert parts.kl == 0.0
    seq = policy_loss(logp, old, adv, mask, epsilon=0.2, aggregation="sequence_mean").loss.item()
    assert seq == pytest.approx((sum(per_row[0]) / 3 + sum(per_row[1]) / 2) / 2, abs=1e-6)
    dr = policy_loss(logp, old, adv, mask, epsilon=0.2, aggregation="dr_grpo", max_new_tokens=4).loss.item()
    assert dr == pytest.approx(sum(tokens) / (2 * 4), abs=1e-6)
    # clip-higher: with epsilon_high 0.3 the 1.22 ratio is no longer clipped
    high = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.3)
    assert high.clip_fraction == 0.0
    assert high.loss.item() == pytest.approx((sum(tokens) + 1.2 - math.exp(0.2)) / 5, abs=1e-6)


def test_policy_loss_gradient_is_the_policy_gradient_when_ratio_is_one():
    logp = torch.tensor([[-1.0, -0.5], [-0.3, -0.7]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 2, dtype=torch.bool)
    policy_loss(logp, logp.detach(), adv, mask, epsilon=0.2).loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(2, 2) / 4)


def test_kl_term_by_hand_and_zero_at_the_reference():
    logp, old, mask, adv = _hand_batch()
    ref = torch.tensor([[-1.1, -0.5, -1.5], [-0.2, -0.7, 0.0]])
    parts = policy_loss(logp, old, adv, mask, epsilon=0.2, beta=0.5, ref_logp=ref)
    k3 = [math.exp(d) - d - 1 for d in (-0.1, 0.0, 0.5, 0.1, 0.0)]
    base = policy_loss(logp, old, adv, mask, epsilon=0.2).loss.item()
    assert parts.kl == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert parts.loss.item() == pytest.approx(base + 0.5 * sum(k3) / 5, abs=1e-6)
    same = policy_loss(logp, old, adv, mask, epsilon=0.2, beta=0.5, ref_logp=logp.clone())
    assert same.kl == 0.0 and same.loss.item() == pytest.approx(base, abs=1e-7)


def test_reference_is_the_base_with_adapters_off():
    torch.manual_seed(0)
    base = random_model("llama", seed=3)
    model = random_model("llama", seed=3)
    apply_lora(model, LoraSettings(r=4, alpha=8))
    x = torch.randint(0, 320, (2, 10))
    y = torch.randint(0, 320, (2, 10))
    y[:, :4] = -100
    with torch.no_grad():
        fresh, ref = token_logps(model, x, y), token_logps(base, x, y)
        assert torch.equal(fresh, ref)  # B = 0: the policy is the reference, so the KL term is 0
        mask = y != -100
        assert policy_loss(fresh, fresh, torch.ones(2), mask, epsilon=0.2, beta=1.0, ref_logp=ref).kl == 0.0
        randomize_adapters(model)
        moved = token_logps(model, x, y)
        with adapters_disabled(model):
            off = token_logps(model, x, y)
        assert not torch.allclose(moved, ref)
        assert torch.allclose(off, ref, atol=1e-6)
        assert torch.equal(token_logps(model, x, y), moved)  # switched back on afterwards
        assert policy_loss(moved, moved, torch.ones(2), mask, epsilon=0.2, beta=1.0, ref_logp=off).kl > 0


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("completion, answer, expected", [
    ("Tom has 3 + 4 = 7 apples. The answer is 7.", 7, 1.0),
    ("The total is 1,234 dollars.", 1234, 1.0),
    ("小明一共有１２个苹果。", 12, 1.0),  # full-width digits
    ("答案：-3", "-3", 1.0),
    ("Each gets 3/4 of a pie", 0.75, 1.0),
    ("It costs 2.50 yuan", "2.5", 1.0),
    ("First 5, then finally 6", 5, 0.0),  # the last number counts
    ("I do not know", 4, 0.0),
    ("The answer is 8", "#### 8 apples", 1.0),
])
def test_exact_answer(completion, answer, expected):
    assert exact_answer("q", completion, answer=answer) == expected


def test_exact_answer_needs_the_field():
    with pytest.raises(LmforgeError, match="answer"):
        exact_answer("q", "7")


def test_regex_reward():
    assert regex("q", "<think>x</think> 42", pattern=r"<think>.*</think>") == 1.0
    assert regex("q", "42", pattern=r"<think>") == 0.0
    assert regex("q", "  42\n", pattern=r"\d+", full=True) == 1.0
    assert regex("q", "42 apples", pattern=r"\d+", full=True) == 0.0
    assert regex("q", "答案是 42", pattern=r"答案是\s*\d+") == 1.0


def test_json_schema_reward():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    assert json_schema("q", '{"name": "李雷", "age": 12}', schema=schema) == 1.0
    assert json_schema("q", 'Here:\n```json\n{"name": "Ann", "age": 3}\n```', schema=schema) == 1.0
    assert json_schema("q", '{"name": "Ann", "age": "3"}', schema=schema) == 0.0
    assert json_schema("q", '{"name": "Ann"', schema=schema) == 0.0
    from_field = build_rewards([RewardSpec(function="json_schema")])[0]  # the schema in the prompt's own line
    assert from_field("q", '{"name": "Ann", "age": 3}', {"schema": schema, "id": "x1"}) == 1.0
    assert from_field("q", '{"name": "Ann"}', {"schema": schema}) == 0.0
    with pytest.raises(LmforgeError, match="not a valid JSON schema"):
        json_schema("q", "{}", schema={"type": "no-such-type"})


def test_code_tests_reward_runs_in_the_sandbox():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert code_tests("q", good, tests=tests) == 1.0
    assert code_tests("q", "def add(a, b):\n    return a - b", tests=tests) == 0.0
    assert code_tests("q", "def add(a, b):\n    while True: pass", tests=tests, timeout=1.5) == 0.0
    assert code_tests("q", "import socket\ndef add(a, b): return a + b", tests=tests) == 0.0  # refused import
    assert code_tests("q", "def add(a, b):\n    return open('/etc/passwd').read() and a + b", tests=tests) == 0.0


def test_rewards_from_a_recipe(tmp_path):
    (tmp_path / "mine.py").write_text("def short(prompt, completion, limit=5, **fields):\n"
                                      "    return float(len(completion) <= limit)\n"
                                      "def broken(prompt, completion, **fields):\n    return None\n")
    specs = [RewardSpec.model_validate("exact_answer"),
             RewardSpec(function=f"{tmp_path / 'mine.py'}:short", weight=0.5, options={"limit": 3}),
             RewardSpec(function="regex", options={"pattern": "^a"})]
    rewards = build_rewards(specs)
    assert [r.name for r in rewards] == ["exact_answer", "short", "regex"]
    assert [r("q", "abc 7", {"answer": 7}) for r in rewards] == [1.0, 0.0, 1.0]
    assert rewards[1]("q", "ab", {}) == 1.0
    broken = build_rewards([RewardSpec(function=f"{tmp_path / 'mine.py'}:broken")])[0]
    with pytest.raises(LmforgeError, match="finite number"):
        broken("q", "x", {})
    for bad, message in [("nope", "expected a built-in"), (f"{tmp_path / 'none.py'}:f", "does not exist"),
                         (f"{tmp_path / 'mine.py'}:missing", "no function missing"),
                         ("no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(LmforgeError, match=message):
            build_rewards([RewardSpec(function=bad)])
    with pytest.raises(LmforgeError, match="invalid"):
        build_rewards([RewardSpec(function="regex", options={"pattern": "("})])


# ----------------------------------------------------------------------------- rollouts and runs


def test_lora_rollouts_merged_equal_unmerged():
    tok = small_tokenizer()
    model = random_model("llama", seed=2, vocab_size=tok.vocab_size, init_std=0.2)
    apply_lora(model, LoraSettings(r=4, alpha=8))
    randomize_adapters(model, scale=1.0)
    prompts = [tok.encode("say red:"), tok.encode("To be, or")]
    params = [SamplingParams(max_new_tokens=8) for _ in prompts]
    log = lambda s: None  # noqa: E731
    merged = Rollouts(model, tok, "merged", 4, [], log)
    unmerged = Rollouts(model, tok, "unmerged", 4, [], log)
    first = [r.token_ids for r in merged.generate(prompts, params)]
    assert first == [r.token_ids for r in unmerged.generate(prompts, params)]
    randomize_adapters(model, seed=5, scale=1.0)  # the policy moves: the merged copy follows it
    second = [r.token_ids for r in merged.generate(prompts, params)]
    assert second != first and second == [r.token_ids for r in unmerged.generate(prompts, params)]


LETTER = "def letter_e(prompt, completion, **fields):\n    return completion.count('e') / max(len(completion), 1)\n"


def grpo_config(tmp_path, over=None):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    (tmp_path / "rewards.py").write_text(LETTER)
    words = ["red", "green", "blue", "sea", "mind", "world", "hello", "yes"]
    rows = [{"prompt": f"say {w}:", "id": f"p{i}", "url": f"https://example.com/{i}"} for i, w in enumerate(words * 4)]
    rows += [{"messages": [{"role": "user", "content": f"请说 {w}"}], "id": f"zh{i}"} for i, w in enumerate(words)]
    train = write_jsonl(tmp_path / "prompts.jsonl", rows)
    raw = {"base": str(base), "task": "grpo", "method": "full", "data": {"train": str(train)},
           "grpo": {"group_size": 6, "max_new_tokens": 8,
                    "rewards": [{"function": f"{tmp_path / 'rewards.py'}:letter_e"}]},
           "train": {"batch_size": 4, "lr": 3e-3, "max_steps": 16, "warmup": 2, "checkpoint_every": 1000,
                     "log_every": 4, "device": "cpu", "dtype": "float32"},
           "eval": {"every": 1000, "batches": 4}, "run": {"name": "grpo", "out": str(tmp_path / "runs")}}
    return load_finetune_config(None, deep_merge(raw, over or {}))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_grpo_raises_the_reward(tmp_path, method):
    over = {"method": method, "train": {"lr": 2e-2 if method == "lora" else 1e-2}, "grpo": {"group_size": 8}}
    result = finetune(grpo_config(tmp_path, over), progress=False, log=lambda s: None)
    train = [r for r in records(result.run_dir) if "reward" in r]
    assert len(train) == 4
    assert train[-1]["reward"] > train[0]["reward"] + 0.15, [r["reward"] for r in train]
    for key in ("reward_std", "reward/letter_e", "reward/letter_e_std", "kl", "clip_fraction", "completion_tokens",
                "zero_advantage_groups",
                "rollout_s", "update_s", "rollout_share"):
        assert all(key in r and math.isfinite(r[key]) for r in train), key
    assert all(0 < r["rollout_share"] < 1 and 0 < r["completion_tokens"] <= 8 for r in train)
    assert result.metrics["val_reward"] > 0.2
    assert (result.output / ("adapter_config.json" if method == "lora" else "config.json")).is_file()
    if method == "full":  # lmforge plot draws the rollout panels
        from lmforge.explain.dashboard import plot_runs

        names = [p.name for p in plot_runs([result.run_dir], tmp_path / "plots")]
        assert {"rl.png", "reward.png", "kl.png", "clip_fraction.png", "step_seconds.png"} <= set(names)
        assert all((tmp_path / "plots" / n).stat().st_size > 5000 for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_equals_an_uninterrupted_run(tmp_path, iterations):
    over = {"method": "lora", "train": {"max_steps": 6, "log_every": 1, "lr": 1e-2},
            "grpo": {"group_size": 4, "num_iterations": iterations, "beta": 0.05}}
    whole = finetune(grpo_config(tmp_path / "a", over), progress=False, log=lambda s: None)
    cfg = grpo_config(tmp_path / "b", over)
    with pytest.raises(TrainingInterrupted):
        finetune(cfg, progress=False, log=lambda s: None, interrupt_at=3)  # mid-rollout when iterations = 2
    resumed = finetune(cfg, resume=True, progress=False, log=lambda s: None)
    a, b = records(whole.run_dir), records(resumed.run_dir)
    keys = ("loss", "reward", "kl", "clip_fraction", "completion_tokens")
    assert [[r.get(k) for k in keys] for r in a if "reward" in r] == [[r.get(k) for k in keys] for r in b if "reward" in r]
    assert sum(r.get("kl", 0) for r in a) > 0
    from safetensors.torch import load_file

    wa = load_file(str(whole.output / "adapter_model.safetensors"))
    wb = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grpo_bad_input(tmp_path):
    cfg = grpo_config(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt here"}])
    with pytest.raises(LmforgeError, match="line 1: expected 'prompt'"):
        finetune(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": str(bad)})}),
                 progress=False, log=lambda s: None)
    with pytest.raises(LmforgeError, match="group_size must be >= 2"):
        grpo_config(tmp_path / "g", {"grpo": {"group_size": 1}})


# ----------------------------------------------------------------------------- the built-in recipe


def test_arithmetic_data_is_checked_and_shipped():
    from lmforge.data.arithmetic import evaluate_equation, problems, recipe_files
    from lmforge.train.finetune import RECIPES

    made = recipe_files()
    for name, rows in made.items():  # the shipped files are what the generator makes
        shipped = [json.loads(line) for line in (RECIPES / "data" / name).read_text(encoding="utf-8").splitlines()]
        assert shipped == rows, name
    held = {r["prompt"] for r in made["arithmetic-heldout.jsonl"]}
    assert not held & {r["prompt"] for r in made["arithmetic-sft.jsonl"]}
    assert not held & {r["prompt"] for r in made["arithmetic-grpo.jsonl"]}
    for p in problems(300, seed=7):
        assert evaluate_equation(p.equation) == p.answer
        assert exact_answer(p.prompt, p.solution, answer=p.answer) == 1.0  # the SFT target earns the reward
        assert exact_answer(p.prompt, p.solution.replace(str(p.answer), str(p.answer + 1)), answer=p.answer) == 0.0
    shaping = build_rewards([RewardSpec(function="lmforge.data.arithmetic:equation_reward")])[0]
    row = made["arithmetic-grpo.jsonl"][0]
    a, op, b = row["equation"].split()
    fields = {k: v for k, v in row.items() if k != "prompt"}
    assert shaping(row["prompt"], f" {a} {op} {b} = 0. The answer is 0.", fields) == 1.0
    assert shaping(row["prompt"], f" {a} {op} {int(b) + 1} = 0.", fields) == 0.0
    langs = {r["lang"] for r in made["arithmetic-grpo.jsonl"]}
    assert langs == {"en", "zh"}
    assert any("答案是" in r["completion"] for r in made["arithmetic-sft.jsonl"])


def test_builtin_grpo_recipes_load():
    cfg = load_finetune_config("grpo-arithmetic")
    assert cfg.task == "grpo" and [r.function for r in cfg.grpo.rewards] == [
        "exact_answer", "lmforge.data.arithmetic:equation_reward"]
    assert len(build_rewards(cfg.grpo.rewards)) == 2
    assert cfg.data.train.endswith("data/arithmetic-grpo.jsonl") and json.loads(
        open(cfg.data.val, encoding="utf-8").readline())["answer"] is not None
    assert load_finetune_config("grpo-arithmetic-sft").task == "sft"
