"""Speculative decoding: greedy outputs equal plain decoding (prompt lookup and a draft model), and
the rejection rule keeps the model's distribution when sampling."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import NgramDrafter, Speculator, verify
from lmforge.model import Transformer

# An editing request: the answer repeats most of the prompt.
DOC = ("def load_orders(path):\n    with open(path) as f:\n        return [json.loads(line) for line in f]\n\n"
       "def total(orders):\n    return sum(o['price'] * o['qty'] for o in orders)\n")
TEXT = [DOC, "Rename total to order_total:\n" + DOC, "修改函数名 total -> order_total, 保持其余代码不变。"] * 10

CHI2_DF5_P001 = 20.515  # the chi-square distribution's 0.999 quantile at 5 degrees of freedom


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=400)


def _model(tokenizer, d_model=64, n_layer=2, seed=0, tie=True) -> Transformer:
    cfg = ModelConfig(family="llama", n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d_model, context=256,
                      vocab_size=tokenizer.vocab_size, tie_embeddings=tie)
    m = Transformer(cfg)
    m.reset_parameters(seed=seed)
    return m.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _model(tokenizer)


def _requests(tokenizer, n_new=40, **params):
    prompts = [TEXT[1], "Rename total to order_total:\n" + DOC[:80], "修改函数名 total"]
    return [Request(tokenizer.encode(p), SamplingParams(max_new_tokens=n_new, **params), logprobs=2)
            for p in prompts]


def _outputs(results):
    return [(r.token_ids, r.finish_reason, [(t.token, t.logprob, t.top) for t in r.tokens]) for r in results]


def _assert_same(outs, plain) -> None:
    """Same tokens and finish reasons; logprobs to float32 rounding (the C decoder's many-row
    kernel rounds a few last bits unlike its one-row kernel)."""
    assert [o[:2] for o in outs] == [o[:2] for o in plain]
    for (_, _, a), (_, _, b) in zip(outs, plain):
        assert [(t, [i for i, _ in top]) for t, _, top in a] == [(t, [i for i, _ in top]) for t, _, top in b]
        torch.testing.assert_close(torch.tensor([lp for _, lp, _ in a]), torch.tensor([lp for _, lp, _ in b]),
                                   rtol=0, atol=1e-5)


def _one_at_a_time(model, tokenizer, requests, speculator=None):
    with Engine(model, tokenizer, speculator=speculator) as engine:
        return [_outputs(engine.generate([r], timeout=120))[0] for r in requests]


def test_prompt_lookup_greedy_equals_plain_decoding(model, tokenizer):
    requests = _requests(tokenizer)
    plain = _one_at_a_time(model, tokenizer, requests)
    spec = Speculator.ngram(k=5)
    _assert_same(_one_at_a_time(model, tokenizer, requests, spec), plain)
    assert spec.stats.accepted > 0 and spec.stats.proposed > spec.stats.accepted


@pytest.mark.parametrize("draft", ["itself", "smaller"])
def test_draft_model_greedy_equals_plain_decoding(model, tokenizer, draft):
    requests = _requests(tokenizer, n_new=24)
    plain = _one_at_a_time(model, tokenizer, requests)
    # a random model with tied embeddings tends to repeat its input, as `model` does; untied, it disagrees
    small = model if draft == "itself" else _model(tokenizer, d_model=32, n_layer=1, seed=3, tie=False)
    spec = Speculator.draft_model(small, model, k=4)
    _assert_same(_one_at_a_time(model, tokenizer, requests, spec), plain)
    if draft == "itself":  # the model agrees with itself: every draft kept
        assert spec.stats.proposed > 0 and spec.stats.accepted == spec.stats.proposed
    else:
        assert spec.stats.accepted < spec.stats.proposed and spec.stats.steps > 0


def test_a_batch_decodes_without_drafts_and_equals_plain(model, tokenizer):
    requests = _requests(tokenizer)
    with Engine(model, tokenizer) as engine:
        plain = _outputs(engine.generate(requests, timeout=120))
    spec = Speculator.ngram(k=5)
    with Engine(model, tokenizer, speculator=spec) as engine:
        together = _outputs(engine.generate(requests, timeout=120))
    assert [o[:2] for o in together] == [o[:2] for o in plain]


def test_sampled_requests_with_drafts_finish_and_stay_in_length(model, tokenizer):
    requests = _requests(tokenizer, n_new=30, temperature=0.7, seed=5)
    spec = Speculator.ngram(k=4)
    outs = _one_at_a_time(model, tokenizer, requests, spec)
    assert spec.stats.steps > 0
    for ids, why, tokens in outs:
        assert len(tokens) <= 30 and why in ("stop", "length")
        assert all(lp <= 0 for _, lp, _ in tokens)
    # a seed gives the same sampled output again
    assert _one_at_a_time(model, tokenizer, requests, Speculator.ngram(k=4)) == outs


def _first_tokens(p: torch.Tensor, q: torch.Tensor | None, trials: int, seed: int) -> torch.Tensor:
    """The first token speculative sampling emits, `trials` times: drafts drawn from q (or a
    point-mass draft of token 0), then the rejection rule against p."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1])
    for _ in range(trials):
        if q is None:
            drafts, qs = [0, 1], None
        else:
            drafts = [int(torch.multinomial(q, 1, generator=g)) for _ in range(2)]
            qs = torch.stack([q, q])
        kept, residual = verify(torch.stack([p, p]), drafts, qs, g)
        first = drafts[0] if kept >= 1 else int(torch.multinomial(residual, 1, generator=g))
        counts[first] += 1
    return counts


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("drafter", ["draft model", "prompt lookup"])
def test_rejection_sampling_keeps_the_target_distribution(drafter):
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.18, 0.12])  # the model's distribution, 6 tokens
    q = torch.tensor([0.40, 0.05, 0.20, 0.05, 0.10, 0.20]) if drafter == "draft model" else None
    counts = _first_tokens(p, q, trials=6000, seed=1234)
    assert _chi2(counts, p) < CHI2_DF5_P001
    # the test can fail: the drafts' own distribution is far outside the bound
    wrong = q if q is not None else torch.tensor([1.0, 0, 0, 0, 0, 0]) * 0.9 + 0.1 / 6
    assert _chi2(counts, wrong) > 10 * CHI2_DF5_P001


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    drafter = NgramDrafter(max_n=3)
    params = SamplingParams()
    ctx = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert drafter.propose(0, ctx, 3, params, None) == ([8, 9, 1], None)
    assert drafter.propose(0, [1, 2, 3, 4], 3, params, None) == ([], None)
    assert drafter.propose(0, [4, 1, 2, 3, 9, 4, 1, 7, 4], 2, params, None) == ([1, 7], None)  # the latest match


def test_bad_speculation_settings_are_refused(tokenizer, model):
    with pytest.raises(LmforgeError, match="at least 1"):
        Speculator.ngram(k=0)
    other = train_tokenizer(TEXT, vocab_size=300)
    with pytest.raises(LmforgeError, match="same tokenizer"):
        Speculator.draft_model(_model(other), model)


def test_drafts_after_a_prefix_cache_hit_equal_plain_decoding(model, tokenizer):
    from lmforge.infer.prefix_cache import PrefixCache

    requests = _requests(tokenizer, n_new=24)
    plain = _one_at_a_time(model, tokenizer, requests + requests)
    cache, spec = PrefixCache(16 << 20), Speculator.ngram(k=4)
    with Engine(model, tokenizer, speculator=spec, prefix_cache=cache) as engine:
        both = [_outputs(engine.generate([r], timeout=120))[0] for r in requests + requests]
    _assert_same(both, plain)
    assert cache.stats.hit_tokens > 0 and spec.stats.accepted > 0
