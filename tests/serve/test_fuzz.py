"""Property-based fuzzing: no input may cause a 5xx, or change what other clients get.

Over /openapi.json with schemathesis (driven through its strategies and hypothesis directly:
its pytest plugin does not run under pytest 9), for every operation, with valid and invalid
inputs; and with hypothesis over the generation fields' extreme values (float32 underflow,
lone surrogates, special tokens, wrong types) while greedy clients stream beside them.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_helpers import KEY, MODEL

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_schema(start_server):
    server = start_server(max_tokens=32)  # every generated request stays cheap
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    statuses: list[int] = []
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not len(op.body):
            continue  # nothing to make invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"]

        call()
    assert statuses
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # valid requests were generated and served, not only refused


# -- the generation fields, beside healthy clients ------------------------------------------------------
ODD_TEXT = ["\x00", "\u2028", "<|im_end|>", "<|endoftext|>", "é", "世界", "🤖", "\n\n", "\ufeff"]
texts = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(ODD_TEXT)), min_size=1, max_size=6).map("".join)
SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]
# Values no field accepts, or none but a few: wrong types, NaN and infinities, out-of-range
# numbers, empty things, lone surrogates, ids outside the vocabulary.
wrong = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.integers(-(2**70), 2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=2),
                  st.sampled_from([0, -1, "", [], [[]], 2**63, 1e308, -1e-300, [10**6], *SURROGATES,
                                   [SURROGATES[0]], [{"type": "text", "text": SURROGATES[1]}]]))
# In range, and at the ends of the ranges: temperatures and penalties that underflow float32.
TINY = [5e-324, 1e-300, 1e-44, 1e-38, 1e-7]


def number(lo: float, hi: float):
    return st.one_of(st.floats(lo, hi, exclude_min=True), st.sampled_from([*TINY, hi]))


FIELDS = {
    "temperature": st.one_of(st.just(0.0), number(0, 2)),
    "top_p": number(0, 1),
    "top_k": st.integers(-1, 500),
    "repetition_penalty": number(0, 10),
    "max_tokens": st.integers(0, 12),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)),
    "stream": st.booleans(),
}
COMPLETION = {**FIELDS, "logprobs": st.integers(0, 20), "echo": st.booleans()}
CHAT = {**FIELDS, "logprobs": st.booleans()}
token_ids = st.lists(st.integers(0, 419), min_size=1, max_size=12)
prompts = st.one_of(texts, st.lists(texts, min_size=1, max_size=3), token_ids, st.lists(token_ids, min_size=1,
                                                                                        max_size=3))
content = st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": content}), min_size=1, max_size=3)


def spoiled(bodies, fields: list[str]):
    """Valid bodies, or ones with one field (or a message's content) made invalid."""
    def spoil(body, field, value):
        if field == "content" and body.get("messages"):
            return {**body, "messages": [*body["messages"][:-1], {**body["messages"][-1], "content": value}]}
        return {**body, field: value}

    return st.one_of(bodies, st.builds(spoil, bodies, st.sampled_from(fields), wrong))


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), spoiled(st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": prompts}, optional=COMPLETION), ["prompt", *COMPLETION])),
    st.tuples(st.just("/v1/chat/completions"), spoiled(st.fixed_dictionaries(
        {"model": st.just(MODEL), "messages": messages}, optional=CHAT),
        ["messages", "content", "top_logprobs", *CHAT])),
    st.tuples(st.just("/tokenize"), spoiled(st.fixed_dictionaries({}, optional={"prompt": texts, "messages": messages}),
                                            ["prompt", "content"])),
)
HEALTHY = ["To be", "ROMEO:", "The king is", "Now is the winter"]


def greedy_stream(client: httpx.Client, prompt: str) -> str:
    parts = []
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                parts += [c["text"] for c in event["choices"]]
    return "".join(parts)


@pytest.mark.slow
def test_fuzzed_generation_fields_beside_healthy_clients(start_server):
    url = start_server(max_tokens=16).url
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        reference = {p: greedy_stream(c, p) for p in HEALTHY}
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def healthy(prompt: str) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            while not done.is_set():
                seen.append((prompt, greedy_stream(c, prompt)))

    clients = [threading.Thread(target=healthy, args=(p,)) for p in HEALTHY]
    for t in clients:
        t.start()
    statuses: list[int] = []
    try:
        @given(request=requests)
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(request):
            path, body = request
            content = json.dumps(body).encode()  # lone surrogates as \ud800, NaN as NaN: both arrive
            with httpx.stream("POST", url + path, content=content, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"}) as r:
                text = r.read().decode()
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body, text[:300])
            if r.status_code >= 400:
                error = json.loads(text)["error"]
                assert error["message"] and error["type"], text
            elif body.get("stream") is True and path != "/tokenize":
                assert '"error"' not in text.replace('"error": null', ""), (body, text[:300])

        fuzz()
    finally:
        done.set()
        for t in clients:
            t.join()
    assert statuses.count(200) >= 40 and sum(400 <= s < 500 for s in statuses) >= 40  # both kinds were tried
    assert len(seen) >= 8
    assert [(p, out) for p, out in seen if out != reference[p]] == []
