"""Automatic prefix caching: a prompt that starts like an earlier one reuses its keys and values,
and every output (tokens and logprobs, greedy and seeded sampling) is what the cache-off engine gives."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine, Request
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

SYSTEM = ("You are a careful support assistant for an online bookshop. Answer in two sentences, cite the order "
          "number when the customer gives one, never promise refunds, and write prices in euros (e.g. 12,50 €). "
          "订单查询请提供订单号 (order id), 我们会在24小时内回复。")
QUESTIONS = ["Where is order 48213?", "Can I return a damaged copy of Dune?", "Do you ship to Lyon?",
             "我的订单 99120 还没到", "What does express shipping cost?", "Is the 2nd edition in stock?",
             "Can I change my address?", "Why was I charged twice?"]
TEXT = [SYSTEM, *QUESTIONS] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=500)


def _model(family: str, vocab: int) -> Transformer:
    extra = {"sliding_window": 24} if family == "mistral" else {}
    cfg = ModelConfig(family=family, n_layer=2, n_head=4, n_kv_head=None if family == "gpt2" else 2,
                      d_model=64, context=256, vocab_size=vocab, **extra)
    m = Transformer(cfg)
    m.reset_parameters(seed=0)
    return m.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "mistral"])
def model(request, tokenizer):
    return _model(request.param, tokenizer.vocab_size)


def _requests(tokenizer, short: bool) -> list[Request]:
    """Chat-like prompts that share the system prompt: `short` ones fit a native step (<= 64 tokens)."""
    system = tokenizer.encode(SYSTEM)
    system = system[:40] if short else system
    reqs = []
    for i, q in enumerate(QUESTIONS):
        sampled = i % 2 == 1
        params = SamplingParams(max_new_tokens=10, temperature=0.9 if sampled else 0.0, top_p=0.95,
                                seed=1000 + i if sampled else None)
        reqs.append(Request(system + tokenizer.encode(" " + q), params, logprobs=2))
    return reqs


def _outputs(results):
    return [(r.token_ids, r.finish_reason, [(t.token, t.logprob, t.top) for t in r.tokens]) for r in results]


def _assert_same(on, off, bitwise: bool) -> None:
    """Same tokens and finish reasons, greedy and sampled; the logprobs bitwise (a native step's
    rows) or to float32 rounding (a PyTorch prefill of the prompt's rest, see prefix_cache)."""
    if bitwise:
        assert on == off
        return
    for wave_on, wave_off in zip(on, off, strict=True):
        for (ids_on, why_on, lp_on), (ids_off, why_off, lp_off) in zip(wave_on, wave_off, strict=True):
            assert (ids_on, why_on) == (ids_off, why_off)
            a = torch.tensor([[lp] + [x for _, x in top] for _, lp, top in lp_on])
            b = torch.tensor([[lp] + [x for _, x in top] for _, lp, top in lp_off])
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _run(model, tokenizer, requests, native=True, prefix_cache=None, waves=2):
    """The requests, `waves` times: all at once (concurrent), so later waves hit what earlier ones stored."""
    with Engine(model, tokenizer, max_batch=4, native=native, prefix_cache=prefix_cache) as engine:
        return [_outputs(engine.generate(requests, timeout=120)) for _ in range(waves)]


@pytest.mark.parametrize("short", [True, False], ids=["in-step", "prefill"])
def test_outputs_equal_with_the_cache_on_and_off(model, tokenizer, short):
    requests = _requests(tokenizer, short)
    assert all(len(r.prompt) <= 64 for r in requests) == short
    off = _run(model, tokenizer, requests)
    cache = PrefixCache(64 << 20)
    on = _run(model, tokenizer, requests, prefix_cache=cache)
    _assert_same(on, off, bitwise=short)
    assert off[0] == off[1]
    shared = (len(requests[0].prompt) - len(tokenizer.encode(" " + QUESTIONS[0]))) // BLOCK * BLOCK
    # the second wave finds at least the shared system prompt of every request
    assert cache.stats.hit_tokens >= len(requests) * shared > 0


def test_reference_path_equal_with_the_cache_on_and_off(tokenizer):
    model = _model("llama", tokenizer.vocab_size)
    for short in (True, False):
        requests = _requests(tokenizer, short)
        cache = PrefixCache(64 << 20)
        _assert_same(_run(model, tokenizer, requests, native=False, prefix_cache=cache),
                     _run(model, tokenizer, requests, native=False), bitwise=False)
        assert cache.stats.hit_tokens > 0


def test_a_tiny_budget_evicts_and_stays_exact(tokenizer):
    model = _model("llama", tokenizer.vocab_size)
    requests = _requests(tokenizer, short=False)
    cache = PrefixCache(0)
    cache.store("probe", list(range(BLOCK)), *_slot_kv(model), 0)  # a zero budget keeps nothing
    assert len(cache) == 0
    block = _block_bytes(model)
    cache = PrefixCache(3 * block)
    off = _run(model, tokenizer, requests, waves=3)
    on = _run(model, tokenizer, requests, prefix_cache=cache, waves=3)
    _assert_same(on, off, bitwise=False)
    assert cache.used_bytes <= 3 * block and len(cache) == 3
    assert cache.stats.evicted_blocks > 0 and cache.stats.hit_tokens > 0


def _slot_kv(model, slots=2, capacity=64, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (slots, cfg.kv_heads, capacity, cfg.dim_head)
    return ([torch.randn(shape, generator=g) for _ in range(cfg.n_layer)],
            [torch.randn(shape, generator=g) for _ in range(cfg.n_layer)])


def _block_bytes(model) -> int:
    cfg = model.config
    return cfg.n_layer * 2 * cfg.kv_heads * BLOCK * cfg.dim_head * 4


def test_lookup_copies_the_longest_cached_prefix_and_leaves_the_last_token(tokenizer):
    model = _model("llama", tokenizer.vocab_size)
    keys, values = _slot_kv(model)
    cache = PrefixCache(1 << 20)
    prompt = list(range(100, 100 + 3 * BLOCK))
    cache.store("prefill", prompt, keys, values, 0)
    assert len(cache) == 3 and cache.used_bytes == 3 * _block_bytes(model)
    empty_k, empty_v = [torch.zeros_like(k) for k in keys], [torch.zeros_like(v) for v in values]
    # the whole prompt again: its last block is left to compute (its last token's logits are needed)
    assert cache.lookup("prefill", prompt, empty_k, empty_v, 1) == 2 * BLOCK
    for k, ek, v, ev in zip(keys, empty_k, values, empty_v):
        assert torch.equal(ek[1, :, :2 * BLOCK], k[0, :, :2 * BLOCK])
        assert torch.equal(ev[1, :, :2 * BLOCK], v[0, :, :2 * BLOCK])
        assert not ek[1, :, 2 * BLOCK:].any() and not ek[0].any()
    assert cache.lookup("prefill", prompt + [7], empty_k, empty_v, 1) == 3 * BLOCK
    # a different first block, another lane, or a prompt shorter than a block: nothing
    assert cache.lookup("prefill", [1] + prompt[1:], empty_k, empty_v, 1) == 0
    assert cache.lookup("native-step", prompt + [7], empty_k, empty_v, 1) == 0
    assert cache.lookup("prefill", prompt[:BLOCK], empty_k, empty_v, 1) == 0
    # the same block after a different parent is another block
    other = [1] * BLOCK + prompt[BLOCK:2 * BLOCK] + [5]
    assert cache.lookup("prefill", other, empty_k, empty_v, 1) == 0
    assert cache.stats.lookups == 6 and cache.stats.hit_tokens == 5 * BLOCK


def test_eviction_takes_the_least_recently_used_chain_ends_first(tokenizer):
    model = _model("llama", tokenizer.vocab_size)
    keys, values = _slot_kv(model)
    block = _block_bytes(model)
    cache = PrefixCache(4 * block)
    a = list(range(3 * BLOCK))
    b = list(range(1000, 1000 + 2 * BLOCK))
    cache.store("prefill", a, keys, values, 0)  # a0 a1 a2
    cache.store("prefill", b, keys, values, 1)  # b0 b1: over budget by one, a's end (a2) goes
    assert len(cache) == 4 and cache.stats.evicted_blocks == 1
    k0 = [torch.zeros_like(k) for k in keys]
    assert cache.lookup("prefill", a + [1], k0, k0, 0) == 2 * BLOCK
    cache.store("prefill", list(range(5000, 5000 + BLOCK)), keys, values, 0)  # b1 is now the oldest
    assert cache.lookup("prefill", b + [1], k0, k0, 0) == BLOCK
    assert cache.lookup("prefill", a + [1], k0, k0, 0) == 2 * BLOCK


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1)
