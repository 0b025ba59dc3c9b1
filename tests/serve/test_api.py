"""The OpenAI-compatible API over real HTTP, driven by the official `openai` client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serve_helpers import KEY, MODEL, OTHER_KEY

from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

PROMPTS = ["To be", "ROMEO:", "The king is", "Now", "question", "But soft, what light", "long live", "window",
           "To be, or not to be, that is", "R", "king", "discontent.", "yonder", "light through", "is the", "be"]


def test_models(client):
    (m,) = client.models.list().data
    assert m.id == MODEL


def test_completion_equals_generate(client, tiny):
    model, tokenizer = tiny
    ref = generate(model, tokenizer, ["To be"], SamplingParams(max_new_tokens=12))[0]
    r = client.completions.create(model=MODEL, prompt="To be", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tokenizer.encode("To be"))
    assert r.usage.completion_tokens == 12


def test_prompt_forms_and_n(client, tiny):
    _, tokenizer = tiny
    a, b = tokenizer.encode("To be"), tokenizer.encode("The king")
    by_text = client.completions.create(model=MODEL, prompt=["To be", "The king"], max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=5, temperature=0)
    one_ids = client.completions.create(model=MODEL, prompt=a, max_tokens=5, temperature=0)
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert one_ids.choices[0].text == by_text.choices[0].text
    sampled = client.completions.create(model=MODEL, prompt=["To be", "The king"], max_tokens=6, n=3,
                                        temperature=1.0, seed=7)
    assert [c.index for c in sampled.choices] == list(range(6))
    again = client.completions.create(model=MODEL, prompt=["To be", "The king"], max_tokens=6, n=3,
                                      temperature=1.0, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert sampled.usage.completion_tokens == 36


def test_streaming_completion_equals_non_streaming(client):
    whole = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0)
    parts, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True):
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].text
    assert finish == "length"


def test_stop_strings(client):
    whole = client.completions.create(model=MODEL, prompt="To be", max_tokens=30, temperature=0).choices[0].text
    stop = whole[6:9]
    r = client.completions.create(model=MODEL, prompt="To be", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == whole[:whole.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def model_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_echo_logprobs_are_the_models_log_likelihoods(client, tiny):
    """What lm-eval's local-completions sends for loglikelihood requests, and how it reads the answer."""
    model, tokenizer = tiny
    pairs = [("To be, or not", " to be"), ("The king is", " dead; long live the king"), ("R", "OMEO: But soft")]
    prompts = [tokenizer.encode(c) + tokenizer.encode(x) for c, x in pairs]
    ctxlens = [len(tokenizer.encode(c)) for c, _ in pairs]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                    temperature=0, seed=1234)
    for choice, ids, ctxlen in zip(out.choices, prompts, ctxlens):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
        expected = model_logprobs(model, ids)
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        continuation = lp.token_logprobs[ctxlen:-1]  # lm-eval's slice
        assert sum(continuation) == pytest.approx(sum(expected[ctxlen - 1:]), abs=1e-3)
        for tok, top in zip(continuation, lp.top_logprobs[ctxlen:-1]):
            assert max(top.values()) >= tok  # what lm-eval's is_greedy compares
        assert "".join(lp.tokens[:len(ids)]) == tokenizer.decode(ids)
    # max_tokens=0 with echo scores the prompt alone.
    zero = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, logprobs=0, echo=True)
    assert zero.choices[0].logprobs.token_logprobs[1:] == pytest.approx(model_logprobs(model, prompts[0]), abs=1e-4)
    assert zero.usage.completion_tokens == 0


def test_generated_token_logprobs_and_alternatives(client, tiny):
    model, tokenizer = tiny
    r = client.completions.create(model=MODEL, prompt="To be", max_tokens=4, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    ref = generate(model, tokenizer, ["To be"], SamplingParams(max_new_tokens=4))[0]
    ids = tokenizer.encode("To be") + ref.token_ids
    assert lp.tokens == [tokenizer.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx(model_logprobs(model, ids)[-4:], abs=1e-4)
    for tok, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(tok)  # greedy: the best one


def test_chat_streaming_and_not(client, tiny):
    model, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ref = generate(model, tokenizer, [tokenizer.encode(prompt)], SamplingParams(max_new_tokens=10))[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    parts, roles = [], []
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            parts.append(c.delta.content or "")
    assert "".join(parts) == ref.text
    assert roles[0] == "assistant" and usage.completion_tokens == 10
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_tokenize_and_detokenize(http, tiny):
    _, tokenizer = tiny
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Héllo, 世界"}).json()
    assert r["tokens"] == tokenizer.encode("Héllo, 世界") and r["count"] == len(r["tokens"])
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Héllo, 世界"
    messages = [{"role": "user", "content": "把 batch size 调大一点"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    assert bare["count"] < chat["count"]  # the assistant header is left off
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_sixteen_concurrent_greedy_requests_equal_sequential(client):
    def ask(i: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=10 + 2 * i,
                                         temperature=0).choices[0].text

    sequential = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    assert concurrent == sequential


def test_health_needs_no_key_and_everything_else_does(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"),
                         ("GET", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL


def test_rate_limits_per_key(start_server):
    server = start_server(requests_per_minute=3, tokens_per_minute=200)
    h = {"Authorization": f"Bearer {KEY}"}
    codes = [httpx.get(server.url + "/v1/models", headers=h).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = httpx.get(server.url + "/v1/models", headers=h)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    # The other key has its own allowance, for tokens too.
    other = openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    used = other.completions.create(model=MODEL, prompt="To be", max_tokens=150, temperature=0).usage.total_tokens
    left = 200 - used  # what the request reserved but did not use came back
    with pytest.raises(openai.RateLimitError):  # reserves prompt + max_tokens: more than is left
        other.completions.create(model=MODEL, prompt="To be", max_tokens=left + 20)
    with pytest.raises(openai.RateLimitError, match="more than your limit"):
        other.completions.create(model=MODEL, prompt="To be", max_tokens=150, n=2)  # 2 x 128 > 200


@pytest.mark.parametrize("body, param", [
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"prompt": "king " * 400}, "prompt"),
    ({"prompt": [[5] * 200]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": ["a"] * 9, "n": 8}, "prompt"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 1e308}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -5}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": None}, "prompt"),
])
def test_caps_and_bad_values_are_400(http, body, param):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "To be", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"].split(".")[0] == param


def test_malformed_bodies(http, server):
    post = lambda content, **h: http.post("/v1/completions", content=content,  # noqa: E731
                                          headers={"Content-Type": "application/json", **h})
    for content in [b"{", b"[]", b"null", b'"text"', b'{"model": "tiny", "prompt": "\xff\xfe"}',
                    b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
                    b'{"model": "tiny", "prompt": "x", "temperature": NaN}', b"\x00\x01"]:
        r = post(content)
        assert r.status_code == 400, (content, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400
    assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "pirate", "content": "x"}]}
                     ).status_code == 400
    r = post(b'{"model": "tiny", "prompt": "' + b"a" * (1 << 20) + b'"}')
    assert r.status_code == 413
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/v1/models").status_code == 200  # and it still serves


def test_client_disconnect_mid_stream_frees_the_slot(server, http):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "To be", "max_tokens": 120, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert got[0].startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = http.get("/metrics").text
        if "lmforge_running_requests 0.0" in metrics:
            break
        time.sleep(0.05)
    assert "lmforge_running_requests 0.0" in metrics
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_overload_is_503_and_the_server_recovers(start_server):
    server = start_server(max_batch=1, max_queue=1)
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 100}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, headers=h,
                                                   timeout=60).status_code, range(8)))
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 1}, headers=h, timeout=60)
    assert r.status_code == 200


def test_metrics(http):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "To be", "max_tokens": 3})
    text = http.get("/metrics").text
    for name in ["lmforge_requests_total", "lmforge_prompt_tokens_total", "lmforge_generation_tokens_total",
                 "lmforge_request_latency_seconds_bucket", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_queue_depth", "lmforge_running_requests"]:
        assert name in text


def test_access_log_has_request_ids_and_no_secrets(http, caplog):
    with caplog.at_level("INFO", logger="lmforge.serve.access"):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "secret prompt", "max_tokens": 2},
                      headers={"X-Request-ID": "abc-123"})
        time.sleep(0.05)
    assert r.headers["x-request-id"] == "abc-123"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "lmforge.serve.access"]
    mine = [x for x in lines if x["request_id"] == "abc-123"]
    assert mine and mine[0]["status"] == 200 and mine[0]["key"].startswith("key-")
    assert mine[0]["completion_tokens"] == 2
    text = caplog.text
    assert KEY not in text and "secret prompt" not in text


def test_cors_closed_by_default_and_opened_by_setting(server, start_server):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    opened = start_server(cors_origins=["https://good.example"])
    r = httpx.options(opened.url + "/v1/completions", headers={**pre, "Origin": "https://good.example"})
    assert r.headers["access-control-allow-origin"] == "https://good.example"
    r = httpx.options(opened.url + "/v1/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers


def test_no_keys_means_open_access(start_server):
    from lmforge.serve.security import ApiKeys

    server = start_server(api_keys=ApiKeys([]))
    assert httpx.get(server.url + "/v1/models").status_code == 200


def test_chat_templates_render_in_a_sandbox(start_server, tiny):
    from lmforge.data.tokenizer import TextTokenizer

    _, tokenizer = tiny
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    evil = TextTokenizer(tokenizer.backend, {**tokenizer.config, "chat_template": hostile})
    server = start_server(tokenizer=evil)
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "unsafe" in r.json()["error"]["message"]


def test_streamed_logprobs_match_the_whole_response(client):
    args = dict(model=MODEL, prompt="The king", max_tokens=12, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**args).choices[0]
    tokens, token_logprobs, offsets, text = [], [], [], ""
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                token_logprobs += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs == whole.logprobs.token_logprobs
