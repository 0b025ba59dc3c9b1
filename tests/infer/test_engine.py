"""The continuous-batching engine against `generate`, the reference for a lone request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, EngineOverloaded, Request
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

TEXT = ["To be, or not to be, that is the question.", "ROMEO: But soft, what light through yonder window breaks?",
        "The king is dead; long live the king!", "Now is the winter of our discontent."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=400)


@pytest.fixture(scope="module", params=["llama", "gpt2", "mistral"])
def model(request, tokenizer):
    extra = {"sliding_window": 24} if request.param == "mistral" else {}
    cfg = ModelConfig(family=request.param, n_layer=2, n_head=4, n_kv_head=None if request.param == "gpt2" else 2,
                      d_model=64, context=96, vocab_size=tokenizer.vocab_size, **extra)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.reset_parameters(seed=0)
    return m.eval()


PROMPTS = ["To be", "ROMEO:", "The king is", "Now", "question", "But soft, what light", "long live", "window",
           "To be, or not to be, that is", "R", "king", "discontent.", "yonder", "light through", "is the", "be"]


def test_sixteen_concurrent_greedy_requests_equal_each_alone(model, tokenizer):
    params = [SamplingParams(max_new_tokens=8 + 3 * i) for i in range(len(PROMPTS))]
    alone = [generate(model, tokenizer, [p], sp)[0] for p, sp in zip(PROMPTS, params)]
    with Engine(model, tokenizer, max_batch=16) as engine:
        results = engine.generate([Request(tokenizer.encode(p), sp) for p, sp in zip(PROMPTS, params)], timeout=120)
    for a, r in zip(alone, results):
        assert r.token_ids == a.token_ids
        assert r.text == a.text
        assert r.finish_reason == a.finish_reason


def test_prompts_longer_than_the_sliding_window_match_generate(model, tokenizer):
    long = tokenizer.encode(" ".join(TEXT[:4]))[:60]  # mistral's window here is 24
    alone = [generate(model, tokenizer, [p], SamplingParams(max_new_tokens=12))[0] for p in (long, long[:30])]
    with Engine(model, tokenizer) as engine:
        results = engine.generate([Request(long, SamplingParams(max_new_tokens=12)),
                                   Request(long[:30], SamplingParams(max_new_tokens=12))], timeout=60)
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]


def test_requests_join_a_running_batch_and_seeded_sampling_matches(model, tokenizer):
    """A small batch forces waiting requests to join as others leave; seeded sampling is per request."""
    params = [SamplingParams(max_new_tokens=5 + 2 * i, temperature=0.9, top_k=20, top_p=0.9, seed=i) for i in range(8)]
    alone = [generate(model, tokenizer, [p], sp)[0] for p, sp in zip(PROMPTS, params)]
    with Engine(model, tokenizer, max_batch=3) as engine:
        results = engine.generate([Request(tokenizer.encode(p), sp) for p, sp in zip(PROMPTS, params)], timeout=120)
        assert engine.running == 0 and engine.queue_depth == 0
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]


def test_stop_strings_and_repetition_penalty_match_generate(model, tokenizer):
    ref = generate(model, tokenizer, ["To be"], SamplingParams(max_new_tokens=30))[0]
    stop = ref.text[5:8]
    assert stop
    for sp in (SamplingParams(max_new_tokens=30, stop=[stop]), SamplingParams(max_new_tokens=20, repetition_penalty=1.3)):
        (a,) = generate(model, tokenizer, ["To be"], sp)
        with Engine(model, tokenizer) as engine:
            (r,) = engine.generate([Request(tokenizer.encode("To be"), sp)], timeout=60)
        assert (r.text, r.finish_reason) == (a.text, a.finish_reason)
    assert r.token_ids == a.token_ids


def test_logprobs_and_prompt_logprobs_are_the_models_own(model, tokenizer):
    prompt = tokenizer.encode("To be, or not to be")
    with Engine(model, tokenizer) as engine:
        (r,) = engine.generate([Request(prompt, SamplingParams(max_new_tokens=3), logprobs=5, prompt_logprobs=True)])
    full = prompt + [t.token for t in r.tokens]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full]))[0].float(), -1)
    expected = [lp[i, full[i + 1]].item() for i in range(len(full) - 1)]
    got = [e.logprob for e in r.prompt[1:]] + [t.logprob for t in r.tokens]
    assert r.prompt[0] is None
    assert got == pytest.approx(expected, abs=1e-4)
    for t in r.tokens:  # greedy: the sampled token is the best alternative
        assert len(t.top) == 5 and t.top[0][0] == t.token and t.top[0][1] == pytest.approx(t.logprob)


def test_bad_requests_are_refused(model, tokenizer):
    with Engine(model, tokenizer) as engine:
        with pytest.raises(LmforgeError, match="context"):
            engine.submit(Request([1] * model.config.context), lambda ev: None)
        with pytest.raises(LmforgeError, match="empty"):
            engine.submit(Request([]), lambda ev: None)
        with pytest.raises(LmforgeError, match="vocabulary"):
            engine.submit(Request([10**9]), lambda ev: None)


def test_cancellation_and_backpressure(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2).start()
    try:
        events: list = []
        first_token, release = threading.Event(), threading.Event()

        def on_event(ev):
            events.append(ev)
            first_token.set()
            release.wait(30)  # hold the engine in its step (decoding is fast) until the others are queued

        long = engine.submit(Request(tokenizer.encode("To be"), SamplingParams(max_new_tokens=90)), on_event)
        assert first_token.wait(30)
        # One running, two may wait; the fourth is refused at once.
        waiting = [engine.submit(Request([5], SamplingParams(max_new_tokens=2)), lambda ev: None) for _ in range(2)]
        with pytest.raises(EngineOverloaded, match="1 of 1 batch slots and 2 of 2 queue places are taken"):
            engine.submit(Request([5]), lambda ev: None)
        long.cancel()
        release.set()
        deadline = time.monotonic() + 30
        while not all(w.finish_reason for w in waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events[-1].finish_reason == "cancelled"
        assert all(w.finish_reason == "length" for w in waiting)
        results = engine.generate([Request([5], SamplingParams(max_new_tokens=2))], timeout=30)
        assert results[0].finish_reason == "length"
        assert long.sampled < 90
    finally:
        engine.stop()


@pytest.mark.parametrize("native", [False, True], ids=["reference-path", "native-path"])
def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, tokenizer, monkeypatch, native):
    prompt = tokenizer.encode("To be")
    with Engine(model, tokenizer, native=native) as engine:
        # A lone sequence decodes through the native decoder, a batch through model.forward.
        target, name = (engine.native, "step") if native else (model, "forward")
        assert target is not None
        real, calls = getattr(target, name), []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(target, name, flaky)
        (r,) = engine.generate([Request(prompt, SamplingParams(max_new_tokens=10))], timeout=30)
        assert r.finish_reason == "error"
        monkeypatch.undo()
        (r,) = engine.generate([Request(prompt, SamplingParams(max_new_tokens=10))], timeout=30)
        assert r.finish_reason == "length" and len(r.token_ids) == 10


def test_a_sequence_whose_sampling_fails_fails_alone(model, tokenizer, monkeypatch):
    """One request that breaks in its own sampling step retires with an error; the requests
    decoded beside it in the same batch give exactly the tokens they give without it."""
    import lmforge.infer.engine as engine_module

    real = engine_module.sample
    poison_seed = 13

    def sample(logits, params, generator):
        if params.seed == poison_seed:
            raise RuntimeError("this sequence's numbers are bad")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    healthy = [Request(tokenizer.encode(p), SamplingParams(max_new_tokens=20, **extra))
               for p, extra in zip(PROMPTS, [{}, {"repetition_penalty": 1.2}, {"temperature": 0.8, "seed": 3}] * 3)]
    poison = [Request(tokenizer.encode(p), SamplingParams(max_new_tokens=20, temperature=1.0, seed=poison_seed))
              for p in PROMPTS[:3]]
    with Engine(model, tokenizer, max_batch=16) as engine:
        clean = engine.generate(healthy, timeout=60)
        mixed = engine.generate([x for pair in zip(healthy, poison + poison + poison) for x in pair], timeout=60)
    assert [r.finish_reason for r in mixed[1::2]] == ["error"] * len(healthy)
    assert [(r.token_ids, r.text, r.finish_reason) for r in mixed[::2]] == \
        [(r.token_ids, r.text, r.finish_reason) for r in clean]
    assert all(r.finish_reason == "length" for r in clean)


def test_extreme_sampling_parameters_never_fail_a_batch(model, tokenizer):
    """Every value the server accepts: a temperature that underflows float32, penalties near 0
    and at 10, top_p near 0. Greedy requests beside them keep their tokens."""
    greedy = [Request(tokenizer.encode(p), SamplingParams(max_new_tokens=16)) for p in PROMPTS[:6]]
    extreme = [SamplingParams(max_new_tokens=16, temperature=t, seed=1) for t in (1e-38, 1e-44, 5e-324)]
    extreme += [SamplingParams(max_new_tokens=16, temperature=1.0, repetition_penalty=r, seed=1) for r in (1e-300, 10.0)]
    extreme += [SamplingParams(max_new_tokens=16, temperature=2.0, top_p=1e-300, seed=1)]
    with Engine(model, tokenizer) as engine:
        clean = engine.generate(greedy, timeout=60)
        mixed = engine.generate(greedy + [Request(tokenizer.encode("To be"), sp) for sp in extreme], timeout=60)
    assert [r.token_ids for r in mixed[:len(greedy)]] == [r.token_ids for r in clean]
    assert all(r.finish_reason in ("length", "stop") for r in mixed), [r.finish_reason for r in mixed]
    # A temperature this small, or top_p this small, is greedy.
    reference = generate(model, tokenizer, ["To be"], SamplingParams(max_new_tokens=16))[0].token_ids
    assert [r.token_ids for r in mixed[len(greedy):len(greedy) + 3]] == [reference] * 3
    assert mixed[-1].token_ids == reference
