"""Multi-turn GRPO environments: the calculator, transcripts assembled from scripted model turns
(plain and chat prompts), tool tokens masked out of the loss and its gradient (by hand), a
reward that reads the transcript, and GRPO teaching a warm-started model to call the tool."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from helpers import save_random_model, small_tokenizer, write_jsonl
from test_grpo import records

from lmforge.data.sft import IGNORE, collate
from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.grpo import policy_loss, token_logps
from lmforge.train.grpo_env import ToolEnvironment, calculator, cut_after_call
from lmforge.train.grpo_settings import EnvironmentSettings, RewardSpec
from lmforge.train.rewards import build_rewards, tool_used

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>'


def test_calculator():
    assert calculator("calculator", {"expression": "17 * 23"}) == "391"
    assert calculator("calculator", {"expression": "(3 + 4) / 2"}) == "3.5"
    assert calculator("calculator", {"expression": "12 ÷ 4 - -1"}) == "4"
    assert calculator("calculator", {"expression": "2 ** 10 % 1000"}) == "24"
    for bad in ("__import__('os').system('ls')", "open('/etc/passwd')", "9 ** 9 ** 9", "x + 1", "[1] * 3"):
        with pytest.raises((ValueError, SyntaxError)):
            calculator("calculator", {"expression": bad})
    with pytest.raises(ValueError, match="expression"):
        calculator("calculator", {"expr": "1 + 1"})


@dataclass
class Tok:
    token: int


@dataclass
class Out:
    tokens: list


class Scripted:
    """A policy that writes the given turns, one per call, and records what it was asked."""

    def __init__(self, tokenizer, turns: list[list[str]]):
        self.tokenizer, self.turns, self.calls = tokenizer, turns, []

    def __call__(self, prompts, params):
        turn = len(self.calls)
        self.calls.append((prompts, params))
        return [Out([Tok(t) for t in self.tokenizer.encode(self.turns[turn][i])]) for i in range(len(prompts))]


def environment(tok, max_turns=3):
    return ToolEnvironment(EnvironmentSettings(function="calculator", tools=["calculator"], max_turns=max_turns),
                           tok, context=512)


def test_transcript_of_a_plain_prompt():
    tok = small_tokenizer()
    prompt = "Q: A box holds 17 rows of 23 eggs. How many eggs?\nA:"
    ids = tok.encode(prompt)
    policy = Scripted(tok, [[" Let me compute." + CALL + " and then junk", " I will answer."],
                            [" The answer is 391.", "unused"]])
    params = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=11), SamplingParams(max_new_tokens=60, seed=12)]
    a, b = environment(tok).run(policy, [prompt, prompt], [ids, ids], [{"answer": 391}, {"answer": 391}], params)
    assert len(policy.calls) == 2 and len(policy.calls[1][0]) == 1  # b ended after one turn: no call
    first, second = [p for p in policy.calls[0][1]], policy.calls[1][1][0]
    assert [p.seed for p in first] == [11, 12] and second.seed == 11 + 7919 and second.stop == ["</tool_call>"]
    turn1 = tok.encode(" Let me compute." + CALL + " and then junk")
    kept = cut_after_call(tok, turn1)
    assert tok.decode(kept).endswith("</tool_call>") and len(kept) < len(turn1)  # the junk after the call is cut
    tool = tok.encode("\n<tool_response>\n391\n</tool_response>\n")
    final = tok.encode(" The answer is 391.")
    assert policy.calls[1][0][0] == ids + kept + tool  # the second turn continues after the tool's output
    assert a.ids == ids + kept + tool + final
    assert a.own == [False] * len(ids) + [True] * len(kept) + [False] * len(tool) + [True] * len(final)
    assert a.model_tokens == len(kept) + len(final)
    assert [m["role"] for m in a.transcript] == ["assistant", "tool", "assistant"]
    call = a.transcript[0]["tool_calls"][0]
    assert a.transcript[0]["content"] == " Let me compute."  # as serve parses it: the call dropped, text kept
    assert call["function"] == {"name": "calculator", "arguments": json.dumps({"expression": "17 * 23"})}
    assert a.transcript[1] == {"role": "tool", "name": "calculator", "tool_call_id": call["id"], "content": "391"}
    assert a.completion == " The answer is 391."
    assert b.transcript == [{"role": "assistant", "content": " I will answer."}] and b.model_tokens == len(
        tok.encode(" I will answer."))


def test_transcript_of_a_chat_prompt_and_tool_errors():
    tok = small_tokenizer()
    chat = [{"role": "user", "content": "小明有17排鸡蛋，每排23个。一共几个？"}]
    ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))
    bad_call = CALL.replace("17 * 23", "17 * apples")
    policy = Scripted(tok, [[bad_call], [CALL], ["答案是391。"]])
    (e,) = environment(tok).run(policy, [chat], [ids], [{"answer": 391}], [SamplingParams(max_new_tokens=60)])
    assert [m["role"] for m in e.transcript] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert e.transcript[1]["content"].startswith("error: ValueError")  # the model is told, the run goes on
    assert e.transcript[3]["content"] == "391"
    # the tool's output comes back in the template's user turn, after the model's turn is closed
    second_prompt = tok.decode(policy.calls[1][0][0])
    assert second_prompt.endswith(bad_call + "<|im_end|>\n<|im_start|>user\n<tool_response>\nerror: ValueError: "
                                  "only numbers and + - * / // % ** ( ) are allowed\n</tool_response><|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert e.completion == "答案是391。"
    rewards = build_rewards([RewardSpec(function="exact_answer"),
                             RewardSpec(function="tool_used", options={"name": "calculator"})])
    fields = {"answer": 391, "transcript": e.transcript}
    assert [r(chat, e.completion, fields) for r in rewards] == [1.0, 1.0]
    assert tool_used(chat, "x", transcript=e.transcript[:2]) == 0.0  # only the error so far
    with pytest.raises(LmforgeError, match="grpo.environment"):
        tool_used(chat, "391")


def test_last_turn_stops_the_episode():
    tok = small_tokenizer()
    ids = tok.encode("Q: 17 * 23?\nA:")
    policy = Scripted(tok, [[CALL]])
    (e,) = environment(tok, max_turns=1).run(policy, ["q"], [ids], [{}], [SamplingParams(max_new_tokens=60)])
    assert len(policy.calls) == 1 and e.done and [m["role"] for m in e.transcript] == ["assistant"]
    assert e.ids[-len(tok.encode(CALL)):] == tok.encode(CALL)  # no tool output after the last turn


class Logits(torch.nn.Module):
    """A 'model' whose logits are one leaf tensor, so their gradient can be read."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids):
        return self.logits[:, :input_ids.shape[1]]


def test_tool_tokens_get_no_gradient_by_hand():
    tok = small_tokenizer()
    ids = tok.encode("Q: 17 * 23?\nA:")
    policy = Scripted(tok, [[CALL, " 5"], [" 391"]])
    episodes = environment(tok).run(policy, ["q", "q"], [ids, ids], [{}, {}], [SamplingParams()] * 2)
    rows = [e.row() for e in episodes]
    b = collate(rows, 0, packed=False)
    x, y = b["input_ids"], b["targets"]
    torch.manual_seed(0)
    model = Logits(torch.randn(2, x.shape[1], tok.vocab_size))
    adv = torch.tensor([1.0, -1.0])
    logp = token_logps(model, x, y)
    parts = policy_loss(logp, logp.detach(), adv, y != IGNORE, epsilon=0.2)
    parts.loss.backward()
    grad = model.logits.grad
    own = torch.tensor([e.own[1:] + [False] * (x.shape[1] - len(e.own) + 1) for e in episodes])
    assert torch.equal(y != IGNORE, own)  # the targets are exactly the model's own tokens
    tool_positions = ~own & (torch.arange(x.shape[1]) >= len(ids) - 1)
    assert tool_positions[0].sum() == len(tok.encode("\n<tool_response>\n391\n</tool_response>\n"))
    assert grad[tool_positions].abs().max() == 0 and grad[:, :len(ids) - 1].abs().max() == 0
    # at the model's tokens: d(-A logp / N)/d logits = -A/N (onehot - softmax), N the batch's own tokens
    n = own.sum()
    for row in range(2):
        for t in own[row].nonzero()[:, 0].tolist():
            p = torch.softmax(model.logits.detach()[row, t], -1)
            expected = -adv[row] / n * (torch.nn.functional.one_hot(y[row, t], tok.vocab_size) - p)
            assert torch.allclose(grad[row, t], expected, atol=1e-7)
    # what is trained on: the call and the answer, not the tool output between them
    assert episodes[0].model_tokens == len(cut_after_call(tok, tok.encode(CALL))) + len(tok.encode(" 391"))


@pytest.mark.slow
def test_grpo_learns_to_call_the_tool(tmp_path):
    """A warm start that calls the calculator on half its samples for every prompt; GRPO with
    tool_used (a reward that reads the transcript) makes the call the habit."""
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2,
                             context=128)  # a call is 76 tokens of this byte-level tokenizer
    call = CALL.replace("17 * 23", "2+3")
    words = ["red", "green", "blue", "sea", "mind", "world", "hello", "yes"]
    sft_rows = [{"prompt": f"say {w}:", "completion": call if j % 2 == 0 else " no"} for w in words for j in range(4)]
    common = {"checkpoint_every": 1000, "warmup": 2, "device": "cpu", "dtype": "float32"}
    sft = finetune(load_finetune_config(None, {
        "base": str(base), "task": "sft", "method": "full", "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl",
                                                                                             sft_rows * 2))},
        "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 60, "log_every": 10, **common},
        "eval": {"every": 1000, "batches": 1}, "run": {"name": "sft", "out": str(tmp_path / "runs")}}),
        progress=False, log=lambda s: None)
    prompts = write_jsonl(tmp_path / "p.jsonl",
                          [{"prompt": f"say {w}:", "id": f"p{i}"} for i, w in enumerate(words * 4)])
    result = finetune(load_finetune_config(None, {
        "base": str(sft.output), "task": "grpo", "method": "full", "data": {"train": str(prompts)},
        "grpo": {"group_size": 8, "max_new_tokens": 80, "temperature": 0.7,
                 "environment": {"function": "calculator", "max_turns": 2}, "rewards": ["tool_used"]},
        "train": {"batch_size": 4, "lr": 3e-4, "max_steps": 12, "log_every": 2, **common},
        "eval": {"every": 1000, "batches": 4}, "run": {"name": "grpo", "out": str(tmp_path / "runs")}}),
        progress=False, log=lambda s: None)
    train = [r for r in records(result.run_dir) if "reward" in r]
    assert len(train) == 6
    rewards = [r["reward"] for r in train]
    assert 0.1 < rewards[0] < 0.7 and rewards[-1] > rewards[0] + 0.25, rewards  # measured 0.36 -> 0.81
    assert all(r["tool_calls"] >= r["reward"] for r in train)  # every rewarded episode made a call
    assert result.metrics["val_reward"] > 0.5


def test_grpo_tools_recipe_loads():
    cfg = load_finetune_config("grpo-tools")
    assert cfg.task == "grpo" and cfg.grpo.environment.function == "calculator"
    assert cfg.grpo.environment.tools == ["calculator"] and cfg.grpo.environment.max_turns == 2
    assert [r.function for r in cfg.grpo.rewards] == ["exact_answer", "tool_used"]
    assert load_finetune_config("grpo-arithmetic").grpo.environment is None  # unchanged: single turn
