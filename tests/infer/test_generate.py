"""KV-cache generation: equal to full recomputation, batching-invariant, stop strings, streaming."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

import lmforge
from lmforge.config import Family
from lmforge.errors import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

# Mistral's (and phi3's) window of 6 is much shorter than the sequences below (up to ~30 tokens).
FAMILY_CASES = [(f, {"sliding_window": 6} if f in ("mistral", "phi3", "mixtral") else {}) for f in get_args(Family)]
FAMILY_IDS = [f + ("-window6" if extra else "") for f, extra in FAMILY_CASES]


def ids(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_kv_cache_greedy_decode_equals_full_recompute(make_model, family, extra):
    model = make_model(family, init_std=0.1, **extra)  # logits of order 1, so 1e-5 is a tight bound
    seq = torch.tensor([ids(5, 320, seed=1)])
    cache = model.new_cache(1)
    with torch.no_grad():
        logits = model(seq, cache)
        torch.testing.assert_close(logits, model(seq), atol=1e-5, rtol=0)
        for _ in range(24):
            nxt = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache)
            torch.testing.assert_close(logits, model(seq)[:, -1:], atol=1e-5, rtol=0)
    assert cache.length == seq.shape[1] == 29


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_chunked_prefill_equals_one_pass(make_model, family, extra):
    model = make_model(family, init_std=0.1, **extra)
    seq = torch.tensor([ids(20, 320, seed=2)])
    cache = model.new_cache(1)
    with torch.no_grad():
        chunks = [model(seq[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 20))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(seq), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_left_padded_batch_gives_each_prompt_its_own_logits(make_model, family, extra):
    model = make_model(family, init_std=0.1, **extra)
    prompts = [ids(n, 320, seed=n) for n in (3, 11, 1, 7)]
    longest = max(map(len, prompts))
    x = torch.zeros(len(prompts), longest, dtype=torch.long)
    pad_mask = torch.zeros_like(x, dtype=torch.bool)
    for r, p in enumerate(prompts):
        x[r, longest - len(p):] = torch.tensor(p)
        pad_mask[r, longest - len(p):] = True
    with torch.no_grad():
        cache = model.new_cache(len(prompts))
        batched = [model(x, cache, pad_mask=pad_mask)[:, -1]]
        steps = torch.tensor([ids(6, 320, seed=99 + r) for r in range(len(prompts))])
        for t in range(steps.shape[1]):
            batched.append(model(steps[:, t:t + 1], cache)[:, -1])
        for r, p in enumerate(prompts):
            full = torch.tensor([p + steps[r].tolist()])
            alone = model(full)[0, len(p) - 1:]
            torch.testing.assert_close(torch.stack([b[r] for b in batched]), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_batched_generation_gives_the_same_tokens_as_each_prompt_alone(make_model, tokenizer, family, extra):
    # A larger init spreads the logits so that no greedy choice is a near tie.
    model = make_model(family, vocab_size=tokenizer.vocab_size, init_std=0.3, **extra)
    prompts = [ids(n, tokenizer.vocab_size, seed=n) for n in (2, 9, 5)]
    params = SamplingParams(max_new_tokens=10)
    batched = generate(model, tokenizer, prompts, params)
    for prompt, together in zip(prompts, batched):
        (alone,) = generate(model, tokenizer, [prompt], params)
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


def test_generate_is_greedy_by_default_and_matches_manual_argmax(make_model, tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.3)
    prompt = ids(4, tokenizer.vocab_size, seed=3)
    (out,) = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=8))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[len(prompt):]


@pytest.fixture(scope="module")
def trained(trained_run):
    return lmforge.load(trained_run.model_dir)


def test_max_new_tokens_and_finish_reason_length(trained):
    (c,) = trained.complete(["1. The king"], max_new_tokens=5)
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.text == trained.tokenizer.decode(c.token_ids, skip_special=True)


def test_stop_string_truncates_and_reports_stop(trained):
    (full,) = trained.complete(["Chapter 2.\n1. The queen"], max_new_tokens=40)
    assert len(full.text) >= 8 and full.finish_reason == "length"
    # Stop at the first line break (or mid-text): the result is everything before the stop string.
    at = full.text.find("\n")
    at = at if 0 <= at <= len(full.text) - 3 else len(full.text) // 2
    stop = full.text[at:at + 3]
    (c,) = trained.complete(["Chapter 2.\n1. The queen"], max_new_tokens=40, stop=["never-there", stop])
    assert c.finish_reason == "stop"
    assert c.text == full.text[:full.text.find(stop)]
    assert len(c.token_ids) < len(full.token_ids)


def test_end_of_text_token_stops_generation(trained):
    eos = trained.tokenizer.eos_id
    model = trained.model
    # Make the end-of-text token win every step.
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab)
        bias[eos] = 1e4
        model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
        try:
            (c,) = trained.complete(["1. The king"], max_new_tokens=10)
        finally:
            model.lm_head._forward_hooks.clear()
    assert c.finish_reason == "stop" and c.text == "" and c.token_ids == []


@pytest.mark.parametrize("stop", [[], ["heart"]])
def test_streamed_pieces_concatenate_to_the_final_text(trained, stop):
    prompts = ["1. The king", "Chapter 9.\n"]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    results = trained.complete(prompts, on_text=lambda row, text: pieces[row].append(text),
                               max_new_tokens=30, temperature=0.8, seed=0, stop=stop)
    for row, c in enumerate(results):
        assert "".join(pieces[row]) == c.text
        if stop:
            assert "heart" not in c.text
        elif len(c.token_ids) > 4:
            assert len(pieces[row]) > 1  # it did stream


def test_streaming_holds_back_incomplete_characters(tokenizer, make_model):
    # Byte-level tokens can split a character; the stream must never show a replacement character.
    model = make_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.3)
    seen: list[str] = []
    (c,) = generate(model, tokenizer, [ids(3, tokenizer.vocab_size, seed=5)], SamplingParams(max_new_tokens=30),
                    on_text=lambda row, text: seen.append(text))
    assert "".join(seen) == c.text


def test_same_seed_same_sample(trained):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a = trained.generate(["The king", "A fool"], seed=7, **kwargs)
    b = trained.generate(["The king", "A fool"], seed=7, **kwargs)
    others = {tuple(trained.generate(["The king", "A fool"], seed=s, **kwargs)) for s in (8, 9)}
    assert a == b
    assert others != {tuple(a)}  # the seed does change the sample


def test_empty_prompt_starts_from_end_of_text(trained):
    (c,) = trained.complete([""], max_new_tokens=3)
    assert len(c.token_ids) == 3


def test_prompt_as_long_as_the_context_is_refused(trained):
    context = trained.config.context
    with pytest.raises(LmforgeError, match="context"):
        trained.complete([[5] * context], max_new_tokens=1)
    (c,) = trained.complete([[5] * (context - 1)], max_new_tokens=10)  # room for exactly one token
    assert len(c.token_ids) == 1 and c.finish_reason == "length"


def test_no_prompts_no_work(trained):
    assert trained.complete([]) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_detokenization_equals_decoding_everything(tokenizer, seed):
    # RowText decodes a short window per token; the pieces must add up to one full decode,
    # for real text with multi-byte characters and for arbitrary ids that split them.
    from lmforge.infer.generate import RowText

    text = "Café 東京 🙂 naïve — ünïcödé\n\tdef f(x): return x ** 2  # ✓"
    streams = [tokenizer.encode(text), torch.randint(0, tokenizer.vocab_size, (200,),
                                                      generator=torch.Generator().manual_seed(seed)).tolist()]
    for ids_ in streams:
        row = RowText(tokenizer, [])
        pieces = [row.add(t) for t in ids_] + [row.flush()]
        assert "".join(pieces) == row.text == tokenizer.decode(ids_, skip_special=True)
        assert all("\ufffd" not in p for p in pieces[:-1] if p) or "\ufffd" in tokenizer.decode(ids_)


def test_incremental_detokenization_stops_at_a_stop_string_split_across_tokens(tokenizer):
    from lmforge.infer.generate import RowText

    ids_ = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    row = RowText(tokenizer, ["fox j", "zzz"])
    pieces = []
    for t in ids_:
        pieces.append(row.add(t))
        if row.stopped:
            break
    assert row.stopped and "".join(pieces) + row.flush() == "the quick brown "
