"""GRPO on a QLoRA policy: rollouts decode the int4 base with the adapter unmerged and equal a
plain greedy decode of the same model, merged rollouts are refused, and the letter-count reward
rises as it does for the full and LoRA policies (tests/finetune/test_grpo.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapters, random_model, small_tokenizer
from test_grpo import grpo_config, records

from lmforge.adapters import apply_lora
from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams
from lmforge.model.lora import LoraSettings, is_quantized, lora_layers
from lmforge.train.finetune import QloraSettings, finetune, quantize_base
from lmforge.train.grpo import Rollouts


def greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards: no cache, no engine."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_qlora_rollouts_decode_the_quantized_base_with_the_adapter():
    tok = small_tokenizer()
    model = random_model("llama", seed=2, vocab_size=tok.vocab_size, init_std=0.2)
    quantize_base(model, QloraSettings(bits=4, group_size=32))
    apply_lora(model, LoraSettings(r=4, alpha=8))
    randomize_adapters(model, scale=1.0)
    assert all(is_quantized(layer.base) for layer in lora_layers(model).values())
    notes = []
    rollouts = Rollouts(model, tok, "auto", 4, [], notes.append)
    assert rollouts.mode == "unmerged" and "adapter unmerged" in notes[0]
    prompts = [tok.encode("say red:"), tok.encode("请说 你好"), tok.encode("To be, or")]
    params = [SamplingParams(max_new_tokens=8) for _ in prompts]
    model.eval()
    got = [r.token_ids for r in rollouts.generate(prompts, params)]
    assert got == [greedy(model, p, 8) for p in prompts]
    with torch.no_grad():  # the adapter matters: the base alone decodes otherwise
        from lmforge.train.grpo import adapters_disabled

        with adapters_disabled(model):
            assert [greedy(model, p, 8) for p in prompts] != got
    with pytest.raises(LmforgeError, match="use unmerged"):
        Rollouts(model, tok, "merged", 4, [], notes.append)


@pytest.mark.slow
def test_qlora_grpo_raises_the_reward(tmp_path):
    over = {"method": "qlora", "qlora": {"bits": 4, "group_size": 32}, "train": {"lr": 2e-2},
            "grpo": {"group_size": 8}}
    notes = []
    result = finetune(grpo_config(tmp_path, over), progress=False, log=notes.append)
    assert any("qlora: base stored as int4" in n for n in notes)
    assert any("rollouts decode the adapter unmerged" in n for n in notes)
    train = [r for r in records(result.run_dir) if "reward" in r]
    assert len(train) == 4
    assert train[-1]["reward"] > train[0]["reward"] + 0.15, [r["reward"] for r in train]
    assert result.metrics["val_reward"] > 0.2
    assert (result.output / "adapter_config.json").is_file()
