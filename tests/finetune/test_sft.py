"""SFT data and training: loss only on assistant/completion tokens, packing that keeps examples
apart, bad input named by line, and runs that learn, checkpoint and resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_model, save_random_model, small_tokenizer, write_jsonl

from lmforge.data.sft import IGNORE, collate, load_sft, to_rows
from lmforge.errors import LmforgeError
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.sft import masked_lm_loss

WORDS = ["red", "green", "blue", "yes", "no", "hello", "world", "sea"]


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def chat_rows(n: int = 64):
    """'say W' -> W, over a handful of words: learnable in a few dozen steps."""
    return [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {w}"},
                          {"role": "assistant", "content": w}]} for w in (WORDS * n)[:n]]


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, label in zip(ex.ids, ex.labels) if label != IGNORE])


def test_chat_masks_everything_but_assistant_turns(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": "world"}]}]
    (ex,), stats = load_sft(write_jsonl(tmp_path / "d.jsonl", rows), tok, 64)
    assert trained_text(tok, ex) == "hello<|im_end|>\nworld<|im_end|>\n"
    # the context is exactly what generation would be given
    prompt = tok.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True)
    assert ex.ids[:len(tok.encode(prompt))] == tok.encode(prompt)
    assert all(label == IGNORE for label in ex.labels[:len(tok.encode(prompt))])
    assert stats.target_tokens == sum(1 for label in ex.labels[1:] if label != IGNORE)


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    (ex,), _ = load_sft(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "say red:", "completion": " red"}]), tok, 64)
    n_prompt = len(tok.encode("say red:"))
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.ids[n_prompt:] and ex.ids[-1] == tok.eos_id
    assert trained_text(tok, ex) == " red<|endoftext|>"


def test_bad_input_is_named_by_line(tmp_path, tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{not json", "[1, 2]",
                                               {"prompt": "a", "completion": "b"}])
    with pytest.raises(LmforgeError, match=r"2 malformed JSONL lines 2, 3"):
        load_sft(bad, tok, 64)
    no_reply = write_jsonl(tmp_path / "noreply.jsonl", [{"prompt": "a", "completion": "b"},
                                                        {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LmforgeError, match="line 2: the conversation has no assistant turn"):
        load_sft(no_reply, tok, 64)
    with pytest.raises(LmforgeError, match="line 1: expected 'messages'"):
        load_sft(write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]), tok, 64)
    with pytest.raises(LmforgeError, match="not found"):
        load_sft(tmp_path / "missing.jsonl", tok, 64)


def test_long_examples_truncate_with_a_count_or_error_by_flag(tmp_path, tok):
    rows = [{"prompt": "say", "completion": " red" * 40}, {"prompt": "say", "completion": " no"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    examples, stats = load_sft(path, tok, 16)
    assert stats.truncated == 1 and len(examples[0].ids) == 17
    with pytest.raises(LmforgeError, match=r"1 example\(s\) are longer than the context of 16 tokens \(line 1\)"):
        load_sft(path, tok, 16, on_long="error")
    # prompts that fill the context leave nothing to learn: an error, not a silent zero loss
    only_prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "to be or not " * 20, "completion": " x"}] * 3)
    with pytest.raises(LmforgeError, match="every label is masked"):
        load_sft(only_prompts, tok, 16)


def test_packing_keeps_examples_apart(tmp_path, tok):
    model = random_model("llama", vocab_size=tok.vocab_size, context=128)
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    examples, _ = load_sft(path, tok, 128)
    packed = to_rows(examples, 128, pack=True)
    assert len(packed) < len(examples)
    with torch.no_grad():
        b = collate(packed, tok.pad_id, packed=True)
        packed_loss = masked_lm_loss(model(b["input_ids"], segment_ids=b["segment_ids"]), b["targets"], "sum")
        padded = collate(to_rows(examples, 128, pack=False), tok.pad_id, packed=False)
        padded_loss = masked_lm_loss(model(padded["input_ids"]), padded["targets"], "sum")
        # and without the segment mask the packed rows would see each other
        leaky = masked_lm_loss(model(b["input_ids"]), b["targets"], "sum")
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    assert abs(leaky - padded_loss) > 1e-3


def sft_config(tmp_path, base, data, over=None):
    raw = {"base": str(base), "task": "sft", "data": {"train": str(data)},
           "train": {"batch_size": 8, "lr": 3e-3, "max_steps": 30, "warmup": 2, "checkpoint_every": 10,
                     "log_every": 5, "device": "cpu", "dtype": "float32"},
           "eval": {"every": 10, "batches": 4}, "run": {"name": "sft", "out": str(tmp_path / "runs")}}
    from lmforge.config import deep_merge

    return load_finetune_config(None, deep_merge(raw, over or {}))


@pytest.mark.parametrize("method,pack", [("full", False), ("lora", True)])
def test_sft_learns_and_validates(tmp_path, tok, method, pack):
    # init_std 0.2: a frozen lm_head of std 0.02 behind a normalization caps logits below 1, which
    # no adapter can overcome; a pretrained model's head is not that small
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(64))
    over = {"method": method, "data": {"pack": pack}}
    if method == "lora":
        over["lora"] = {"r": 8, "alpha": 16}
        over["train"] = {"lr": 1e-2}
    result = finetune(sft_config(tmp_path, base, train, over), progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < 0.7 * losses[0] and len(vals) >= 3 and vals[-1] < vals[0]
    assert (result.output / ("adapter_config.json" if method == "lora" else "model.safetensors")).is_file()
    assert (result.run_dir / "latest").resolve().name == "step-000030"


def test_sft_resume_matches_an_uninterrupted_run(tmp_path, tok):
    from lmforge.errors import TrainingInterrupted

    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))
    over = {"method": "lora", "train": {"max_steps": 12, "checkpoint_every": 4}}
    full = finetune(sft_config(tmp_path / "a", base, train, over), progress=False, log=lambda s: None)
    cfg = sft_config(tmp_path / "b", base, train, over)
    with pytest.raises(TrainingInterrupted):
        finetune(cfg, progress=False, log=lambda s: None, interrupt_at=6)
    with pytest.raises(LmforgeError, match="already has checkpoints"):
        finetune(cfg, progress=False, log=lambda s: None)
    resumed = finetune(cfg, resume=True, progress=False, log=lambda s: None)
    from safetensors.torch import load_file

    a = load_file(str(full.output / "adapter_model.safetensors"))
    b = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_cli_and_config_errors(tmp_path, tok, cli, lmforge_main, monkeypatch):
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    r = cli("finetune", base, "--data", train, "--method", "lora", "--name", "cli", "--train.max_steps", "4",
            "--train.device", "cpu", "--lora.r", "4", "--no-progress", "--run.out", tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "cli" / "adapter" / "adapter_config.json").is_file()
    # the refusals in this process (from tmp_path, as `cli` runs): a console script each costs seconds
    monkeypatch.chdir(tmp_path)
    code, _, err = lmforge_main("finetune", base, "--data", train, "--lora.rank", "4")
    assert code == 2 and "lora.rank: unknown key" in err
    code, _, err = lmforge_main("finetune", base, "--data", train, "--method", "lora", "--lora.targets", "[c_attn]",
                                "--run.out", tmp_path / "runs2")
    assert code == 2 and "not a module of this llama model" in err
    code, _, err = lmforge_main("finetune", base)
    assert code == 2 and "data.train is required" in err


def test_sft_with_loss_chunk_ends_where_it_would_without(tmp_path, tok, monkeypatch):
    """train.loss_chunk (lm_head + cross-entropy a few tokens at a time) is the same training."""
    from safetensors.torch import load_file

    from lmforge.train import losses

    chunked_calls = []
    chunked = losses.chunked_cross_entropy
    monkeypatch.setattr(losses, "chunked_cross_entropy", lambda *a: chunked_calls.append(a[3]) or chunked(*a))
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    results = []
    for chunk in (0, 48):  # 48 does not divide the packed rows
        over = {"method": "lora", "data": {"pack": True}, "eval": {"every": 2, "batches": 1},
                "train": {"max_steps": 4, "loss_chunk": chunk}, "run": {"name": f"chunk-{chunk}"}}
        with monkeypatch.context() as m:
            if chunk == 0:  # the reference: PyTorch's own cross-entropy over the full logits
                m.setattr(losses, "_native_cross_entropy", lambda: None)
            results.append(finetune(sft_config(tmp_path, base, train, over), progress=False, log=lambda s: None))
    assert chunked_calls == [48] * 4  # the second run's 4 steps, and only those
    a, b = (load_file(str(r.output / "adapter_model.safetensors")) for r in results)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert results[0].train_loss == pytest.approx(results[1].train_loss, abs=1e-5)
    dpo = {"task": "dpo", "train": {"loss_chunk": 8}}
    with pytest.raises(LmforgeError, match="train.loss_chunk applies to pretraining and task sft"):
        sft_config(tmp_path, base, train, dpo)


def test_sft_with_activation_checkpointing_ends_where_it_would_without(tmp_path, tok, monkeypatch):
    """train.activation_checkpointing (each block recomputed in backward) is the same training."""
    from safetensors.torch import load_file

    from lmforge.train import distributed

    calls = []
    real = distributed.checkpoint_activations
    monkeypatch.setattr(distributed, "checkpoint_activations", lambda m: calls.append(m) or real(m))
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    results = []
    for on in (False, True):
        over = {"method": "lora", "eval": {"every": 2, "batches": 1},
                "train": {"max_steps": 4, "activation_checkpointing": on}, "run": {"name": f"ckpt-{on}"}}
        results.append(finetune(sft_config(tmp_path, base, train, over), progress=False, log=lambda s: None))
    assert len(calls) == 1  # the second run only
    a, b = (load_file(str(r.output / "adapter_model.safetensors")) for r in results)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert results[0].train_loss == pytest.approx(results[1].train_loss, abs=1e-5)
