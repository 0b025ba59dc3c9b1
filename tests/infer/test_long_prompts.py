"""Long prompts: chunked prefill equals one forward and bounds memory; the int8 KV cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.chunked_prefill import check_chunk, chunk_bounds, prefill
from lmforge.infer.engine import Engine, Request
from lmforge.infer.generate import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model.kv_int8 import new_cache, quantize_rows
from lmforge.train.estimate import cpu_peak_bytes

TEXT = ["Les modèles de langue lisent des documents longs: a 4,096-token contract, a log file, a 论文 with English terms.",
        "<div class='nav'>Home | About</div><p>Chunked prefill feeds the prompt a few hundred tokens at a time.</p>",
        "长上下文推理 (long-context inference) 需要 KV cache; int8 keys and values halve its memory."] * 30

FAMILIES = [("llama", {}), ("gpt2", {}), ("mistral", {"sliding_window": 16}), ("gemma2", {"sliding_window": 16})]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=400)


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(" ".join(TEXT))
    assert len(ids) >= n
    return ids[:n]


def test_chunk_bounds_cover_the_prompt_once():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, None) == [(0, 10)]
    assert chunk_bounds(3, 8) == [(0, 3)]
    assert check_chunk(0) is None
    with pytest.raises(LmforgeError, match="prefill-chunk"):
        check_chunk(-3)


@pytest.mark.parametrize("family,extra", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 7, 16, 50])
def test_chunked_prefill_gives_the_logits_of_one_forward(make_model, tokenizer, family, extra, chunk):
    model = make_model(family, vocab_size=tokenizer.vocab_size, context=64, init_std=0.3, **extra)
    ids = torch.tensor([prompt_ids(tokenizer, 50)])
    whole = prefill(model, ids, model.new_cache(1, 64), chunk=None, all_logits=True)
    chunked = prefill(model, ids, model.new_cache(1, 64), chunk=chunk, all_logits=True)
    assert chunked.shape == whole.shape == (1, 50, tokenizer.vocab_size)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
    last = prefill(model, ids, model.new_cache(1, 64), chunk=chunk)
    torch.testing.assert_close(last, whole[:, -1:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [3, 16])
def test_chunked_prefill_of_a_left_padded_batch(make_model, tokenizer, chunk):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, context=64, init_std=0.3)
    long, short = prompt_ids(tokenizer, 40), prompt_ids(tokenizer, 40)[5:27]
    ids = torch.zeros(2, 40, dtype=torch.long)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    ids[0], pad[0] = torch.tensor(long), True
    ids[1, 18:], pad[1, 18:] = torch.tensor(short), True
    whole = prefill(model, ids, model.new_cache(2, 64), pad, chunk=None)
    chunked = prefill(model, ids, model.new_cache(2, 64), pad, chunk=chunk)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
    alone = prefill(model, torch.tensor([short]), model.new_cache(1, 64), chunk=chunk)
    torch.testing.assert_close(chunked[1], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_generate_gives_the_same_greedy_tokens_at_every_chunk_size(make_model, tokenizer, native):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, context=128, init_std=0.3)
    prompts = [prompt_ids(tokenizer, 90), prompt_ids(tokenizer, 61)]
    params = SamplingParams(max_new_tokens=12)
    runs = [generate_ids(model, prompts, params, None, native=native, prefill_chunk=c)[0] for c in (None, 1, 13, 64)]
    assert all(len(r) == 12 for r in runs[0])
    assert runs[1:] == [runs[0]] * 3


def test_engine_prefills_a_long_prompt_in_chunks_to_the_same_tokens(make_model, tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, context=256, init_std=0.3)
    prompt = prompt_ids(tokenizer, 200)  # past PROMPT_IN_STEP_MAX: the PyTorch prefill
    params = SamplingParams(max_new_tokens=10)
    (want,), _ = generate_ids(model, [prompt], params, None, prefill_chunk=None)
    for chunk in (None, 37, 64):
        with Engine(model, tokenizer, max_batch=2, prefill_chunk=chunk) as engine:
            (result,) = engine.generate([Request(prompt=prompt, params=params)], timeout=120)
        assert result.token_ids == want


def test_engine_prompt_logprobs_are_the_same_chunked(make_model, tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, context=256, init_std=0.3)
    prompt = prompt_ids(tokenizer, 150)
    params = SamplingParams(max_new_tokens=1)
    echoes = []
    for chunk in (None, 40):
        with Engine(model, tokenizer, max_batch=1, prefill_chunk=chunk) as engine:
            (result,) = engine.generate([Request(prompt=prompt, params=params, prompt_logprobs=True)], timeout=120)
        echoes.append([None if e is None else e.logprob for e in result.prompt])
    assert len(echoes[0]) == 150 and echoes[0][0] is None
    assert echoes[1][1:] == pytest.approx(echoes[0][1:], abs=1e-4)


@pytest.mark.slow
def test_an_8k_prefill_in_chunks_keeps_memory_far_below_a_whole_prompt_score_matrix(make_model):
    T = 8192
    model = make_model("llama", vocab_size=320, context=T, d_model=64)
    ids = torch.randint(0, 320, (1, T), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(1, T, dtype=torch.bool)
    pad[0, :100] = False  # left padding: one forward would need a (T, T) mask and scores
    cache = model.new_cache(1, T)
    peak = cpu_peak_bytes(lambda: prefill(model, ids, cache, pad, chunk=512))
    cache_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    one_head_scores = T * T * 4  # what one forward's fp32 scores would take, for a single head
    assert peak < one_head_scores / 2, f"chunked 8k prefill peaked at {peak / 2**20:.0f} MiB"
    assert peak < 64 * 2**20
    assert cache.length == T and cache_bytes > 0


# -- the int8 KV cache -------------------------------------------------------------------------

def test_int8_rows_round_trip_within_half_a_step():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 30.0, 0.01])[:, None, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    assert (q.abs().amax(-1) == 127).all()  # each vector uses its whole range
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-7).all()
    q0, s0 = quantize_rows(torch.zeros(1, 1, 1, 4))
    assert (q0 == 0).all() and torch.isfinite(s0).all()


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gpt2", {}), ("mistral", {"sliding_window": 16})])
def test_int8_cache_logits_are_close_to_the_float_cache(make_model, tokenizer, family, extra):
    model = make_model(family, vocab_size=tokenizer.vocab_size, context=64, d_model=64, init_std=0.1, **extra)
    ids = torch.tensor([prompt_ids(tokenizer, 60)])
    fp = prefill(model, ids, new_cache(model, 1, 64), chunk=16, all_logits=True)
    q = prefill(model, ids, new_cache(model, 1, 64, "int8"), chunk=16, all_logits=True)
    err = (q - fp).abs().max() / fp.abs().max()
    assert 0 < err < 0.02, err  # int8 changes the numbers, a little
    agree = (q.argmax(-1) == fp.argmax(-1)).float().mean()
    assert agree >= 0.95


def test_int8_cache_storage_is_under_a_third_of_fp32_and_about_half_of_bf16(make_model):
    model = make_model("llama", d_model=256, n_head=4, n_kv_head=2, context=128)  # head_dim 64
    fp32, int8 = new_cache(model, 2, 128), new_cache(model, 2, 128, "int8")
    assert fp32.nbytes() == 2 * 2 * 2 * 2 * 128 * 64 * 4  # layers x (k, v) x batch x heads x slots x dim x 4 B
    assert int8.nbytes() / fp32.nbytes() == pytest.approx((1 + 4 / 64) / 4)  # int8 + an fp32 scale per vector
    bf16_model = model.to(torch.bfloat16)
    bf16, int8_bf16 = new_cache(bf16_model, 2, 128), new_cache(bf16_model, 2, 128, "int8")
    assert int8_bf16.nbytes() / bf16.nbytes() == pytest.approx((1 + 2 / 64) / 2)  # ~0.52: halved, less the scales
    assert all(k.dtype == torch.int8 for k in int8.k + int8.v)


def test_generate_with_an_int8_cache_decodes_through_pytorch_and_says_so(make_model, tokenizer, capsys):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, context=128, d_model=64, init_std=0.1)
    prompts = [prompt_ids(tokenizer, 70), prompt_ids(tokenizer, 33)]
    params = SamplingParams(max_new_tokens=10)
    fp, _ = generate_ids(model, prompts, params, None)
    q, finish = generate_ids(model, prompts, params, None, kv_cache_dtype="int8", prefill_chunk=16)
    assert finish == ["length", "length"] and [len(r) for r in q] == [10, 10]
    assert [r[:3] for r in q] == [r[:3] for r in fp]  # greedy paths may part later, on a near tie
    assert "an int8 KV cache decodes through the PyTorch model" in capsys.readouterr().err
    ref, _ = generate_ids(model, prompts, params, None, native=False, kv_cache_dtype="int8", prefill_chunk=16)
    assert ref == q


def test_an_unknown_kv_cache_dtype_is_a_user_error(make_model):
    with pytest.raises(LmforgeError, match="unknown KV cache dtype 'fp8'"):
        generate_ids(make_model("llama"), [[1, 2, 3]], SamplingParams(max_new_tokens=2), None, kv_cache_dtype="fp8")
