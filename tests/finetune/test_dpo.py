"""DPO: the chosen-over-rejected reward margin rises over training, in full and with LoRA."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import save_random_model, small_tokenizer, write_jsonl

import lmforge
from lmforge.config import deep_merge
from lmforge.data.sft import IGNORE, encode_example
from lmforge.errors import LmforgeError
from lmforge.train.dpo import DPOTask
from lmforge.train.finetune import finetune, load_finetune_config

WORDS = ["red", "green", "blue", "sea", "mind", "world"]


def preference_rows(n: int, seed: int, chat: bool = False):
    """Prefer answering with the word asked for over another word (as a chat: the user asks)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w, other = rng.sample(WORDS, 2)
        if chat:
            rows.append({"messages": [{"role": "user", "content": f"say {w}"}], "chosen": w, "rejected": other})
        else:
            rows.append({"prompt": f"say {w}:", "chosen": f" {w}", "rejected": f" {other}"})
    return rows


def dpo_config(tmp_path, base, train, val, over=None):
    raw = {"base": str(base), "task": "dpo", "data": {"train": str(train), "val": str(val)},
           "dpo": {"beta": 0.5},
           "train": {"batch_size": 8, "lr": 3e-3, "max_steps": 30, "warmup": 2, "checkpoint_every": 1000,
                     "log_every": 5, "device": "cpu"},
           "eval": {"every": 10, "batches": 10}, "run": {"name": "dpo", "out": str(tmp_path / "runs")}}
    return load_finetune_config(None, deep_merge(raw, over or {}))


@pytest.mark.parametrize("method, chat", [("full", False), ("lora", False), ("lora", True)])
def test_dpo_raises_the_margin(tmp_path, method, chat):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(128, 0, chat))
    val = write_jsonl(tmp_path / "val.jsonl", preference_rows(32, 1, chat))
    over = {"method": method, **({"train": {"lr": 1e-2}} if method == "lora" else {})}
    result = finetune(dpo_config(tmp_path, base, train, val, over), progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert len(margins) >= 3 and margins[-1] > margins[0] and margins[-1] > 0.5
    assert result.metrics["preference_accuracy"] > 0.8


def test_dpo_bad_input(tmp_path):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b"}])
    with pytest.raises(LmforgeError, match="line 2: expected string fields"):
        finetune(dpo_config(tmp_path, base, bad, bad), progress=False, log=lambda s: None)


# A template unlike ChatML (role headers, the eos token ending each turn), so that a reply
# rendered with the default template instead of the model's would not match.
TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")


def test_dpo_renders_a_chat_with_the_models_template_as_sft_does(tmp_path):
    tok = small_tokenizer()
    tok.config["chat_template"] = TEMPLATE
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, context=256)
    loaded = lmforge.load(base)
    assert loaded.tokenizer.chat_template == TEMPLATE
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    rows = [{"messages": chat, "chosen": "Red.", "rejected": "No."},
            {"prompt": chat, "chosen": [{"role": "assistant", "content": "Green."}],  # the TRL layout
             "rejected": [{"role": "assistant", "content": "Never."}]},
            {"prompt": "say red:", "chosen": " red", "rejected": " blue"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    task = DPOTask(dpo_config(tmp_path, base, data, data), loaded, torch.device("cpu"), lambda s: None)
    assert [p["line"] for p in task.pairs] == [1, 2, 3]
    t = loaded.tokenizer
    context = t.apply_chat_template(chat, add_generation_prompt=True)
    assert context.endswith("Another?<|endoftext|>\n### assistant:\n")
    for pair, (chosen, rejected) in zip(task.pairs[:2], [("Red.", "No."), ("Green.", "Never.")]):
        for row, reply in zip(pair["rows"], (chosen, rejected)):
            # The same tokens SFT trains on for this conversation ending in the reply...
            sft = encode_example(t, {"messages": [*chat, {"role": "assistant", "content": reply}]}, 1, data)
            assert row.inputs == sft.ids[:-1]
            # ...but only the reply and its end-of-turn marker are compared; "Blue." is context.
            trained = [y for y in row.targets if y != IGNORE]
            assert t.decode(trained) == reply + "<|endoftext|>\n"
            assert row.targets[:len(row.targets) - len(trained)] == [IGNORE] * (len(row.targets) - len(trained))
            assert sum(y != IGNORE for y in sft.labels) > len(trained)  # SFT also trains on "Blue."
            assert t.decode(row.inputs[:len(row.inputs) - len(trained) + 1]) == context
    text = task.pairs[2]["rows"][0]  # a text prompt is continued as it is, then EOS
    assert row_ids(text) == t.encode("say red:") + t.encode(" red") + [t.eos_id]


def row_ids(row) -> list[int]:
    return row.inputs + row.targets[-1:]


def test_dpo_chat_bad_input(tmp_path):
    tok = small_tokenizer()
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    cases = [({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
               "chosen": "a", "rejected": "b"}, "ends with an assistant turn"),
             ({"messages": "hi", "chosen": "a", "rejected": "b"}, "'prompt' \\(text\\) or 'messages'"),
             ({"chosen": "a", "rejected": "b"}, "'prompt' \\(text\\) or 'messages'"),
             ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "needs a string 'role' and 'content'"),
             ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
              "expected string fields 'chosen' and 'rejected'")]
    for i, (row, message) in enumerate(cases):
        bad = write_jsonl(tmp_path / f"bad{i}.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
        with pytest.raises(LmforgeError, match=f"line 2: .*{message}"):
            finetune(dpo_config(tmp_path, base, bad, bad), progress=False, log=lambda s: None)
