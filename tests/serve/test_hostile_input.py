"""Hostile and faulty input, each probe of a real server over loopback: one request never fails,
stalls or reaches past another (issue 17's probes, kept as tests)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import KEY, MODEL

from lmforge.errors import LmforgeError

AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["To be", "ROMEO:", "The king is", "Now", "But soft, what light", "long live", "window", "discontent."]


def post_raw(url: str, body: dict, path: str = "/v1/completions", timeout: float = 60) -> httpx.Response:
    """JSON as Python writes it with ensure_ascii: lone surrogates go out as \\ud800 escapes."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=timeout,
                      headers={**AUTH, "Content-Type": "application/json"})


def stream_text(url: str, body: dict, path: str = "/v1/completions") -> str:
    """The streamed text, or "ERROR: ..." if the stream ended with an error event."""
    parts = []
    with httpx.stream("POST", url + path, headers=AUTH, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return "ERROR: " + event["error"]["message"]
            for c in event["choices"]:
                parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(parts)


def healthy(i: int) -> dict:
    return {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": 40, "temperature": 0}


def exchange(port: int, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes; what came back until the server closed the connection, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
    return got, time.monotonic() - started


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


# -- sampling and failures ---------------------------------------------------------------------------
POISON = [{"temperature": 1e-44}, {"temperature": 5e-324}, {"temperature": 1e-38, "top_p": 1e-300},
          {"temperature": 1.0, "repetition_penalty": 1e-300, "seed": 1},
          {"temperature": 2.0, "top_p": 1e-300, "top_k": 1, "seed": 2}, {"temperature": 2.0, "repetition_penalty": 10.0}]


def test_extreme_sampling_values_never_touch_the_greedy_streams_beside_them(start_server):
    """temperature 1e-44 made the sampler raise on inf/nan, and the engine then failed every
    sequence of the batch: here 8 greedy streams run with such requests interleaved."""
    url = start_server().url
    reference = [stream_text(url, healthy(i)) for i in range(8)]
    with ThreadPoolExecutor(24) as pool:
        poisoned = []
        streams = []
        for i in range(8):
            streams.append(pool.submit(stream_text, url, healthy(i)))
            for p in POISON[i % 3::3]:
                body = {"model": MODEL, "prompt": PROMPTS[-i], "max_tokens": 30, **p}
                poisoned.append(pool.submit(post_raw, url, body) if i % 2 else pool.submit(stream_text, url, body))
        outputs = [f.result() for f in streams]
        results = [f.result() for f in poisoned]
    assert outputs == reference
    for r in results:  # each extreme request is served too, not refused
        assert not isinstance(r, str) or not r.startswith("ERROR"), r
        assert isinstance(r, str) or r.status_code == 200, r.text


def test_a_request_that_fails_in_the_engine_fails_alone(start_server, monkeypatch):
    """A fault in one sequence's step is that request's 500 (or its stream's error event);
    the streams beside it, greedy and seeded, give what they give without it."""
    import lmforge.infer.engine as engine_module

    url = start_server().url
    sampled = {"model": MODEL, "prompt": "The king", "max_tokens": 30, "temperature": 0.9, "seed": 4}
    reference = [stream_text(url, healthy(i)) for i in range(8)] + [stream_text(url, sampled)]
    real = engine_module.sample

    def sample(logits, params, generator):
        if params.seed == 13:
            raise FloatingPointError("this request's numbers broke")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    bad = {"model": MODEL, "prompt": "To be", "max_tokens": 30, "temperature": 1.0, "seed": 13}
    with ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(stream_text, url, healthy(i)) for i in range(8)]
        streams.append(pool.submit(stream_text, url, sampled))
        failing = [pool.submit(post_raw, url, bad) for _ in range(3)] + [pool.submit(stream_text, url, bad)]
        outputs = [f.result() for f in streams]
        *whole, streamed = [f.result() for f in failing]
    assert outputs == reference
    for r in whole:
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert streamed.startswith("ERROR: generation failed")


# -- input that is not Unicode --------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a\ud800b"}),
    ("/v1/completions", {"prompt": ["fine", "\udfff"]}),
    ("/v1/completions", {"prompt": "fine", "stop": ["\ud800"]}),
    ("/v1/completions", {"prompt": "\ud800", "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
                              "stream": True}),
    ("/tokenize", {"prompt": "\ud800"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body):
    r = post_raw(server.url, {"model": MODEL, "max_tokens": 2, **body}, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "lone UTF-16 surrogate" in error["message"]
    assert error["param"].split(".")[0] in ("prompt", "stop", "messages")


def test_surrogates_in_unknown_fields_and_model_names(server):
    r = post_raw(server.url, {"model": MODEL, "prompt": "To be", "max_tokens": 2, "user": "\ud800"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    r = post_raw(server.url, {"model": "\ud800" * 300, "prompt": "To be"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# -- long prompts ------------------------------------------------------------------------------------
def health_latencies_while(url: str, work) -> list[float]:
    latencies: list[float] = []
    done = threading.Event()

    def poll():
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get(url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        work()
    finally:
        done.set()
        poller.join()
    return latencies


def megabyte_prompts(url: str, clients: int, each: int) -> list[httpx.Response]:
    body = json.dumps({"model": MODEL, "prompt": "king and queen " * 66_000, "max_tokens": 2}).encode()
    assert len(body) < 1 << 20

    def send(_):
        with httpx.Client(timeout=120, headers={**AUTH, "Content-Type": "application/json"}) as c:
            return [c.post(url + "/v1/completions", content=body) for _ in range(each)]

    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(send, range(clients)) for r in rs]


def test_megabyte_prompts_are_refused_by_size_without_stalling_the_server(server):
    """Tokenized on the event loop, four clients' 1 MB prompts held /health for up to 2.5 s."""
    results: list[httpx.Response] = []
    latencies = health_latencies_while(server.url, lambda: results.extend(megabyte_prompts(server.url, 4, 3)))
    for r in results:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "990000 bytes" in r.json()["error"]["message"]
    assert max(latencies) < 0.75 and statistics.median(latencies) < 0.2, latencies


def test_prompts_the_size_cannot_refuse_are_tokenized_off_the_event_loop(start_server, tiny):
    """A tokenizer that drops whitespace gives no bytes-per-token bound, so 1 MB prompts are
    tokenized (~1 s each): in a worker thread, with the GIL released, /health stays quick."""
    from tokenizers import Tokenizer, pre_tokenizers

    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.prompt_size import max_bytes_per_token

    _, tokenizer = tiny
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    unbounded = TextTokenizer(backend, tokenizer.config)
    assert max_bytes_per_token(unbounded) is None
    url = start_server(tokenizer=unbounded).url
    results: list[httpx.Response] = []
    latencies = health_latencies_while(url, lambda: results.extend(megabyte_prompts(url, 3, 1)))
    for r in results:
        assert r.status_code == 400 and re.search(r"the prompt has \d{5,} tokens", r.json()["error"]["message"])
    assert max(latencies) < 0.75 and statistics.median(latencies) < 0.2, latencies


def test_bytes_per_token_bounds(tiny):
    from tokenizers import Tokenizer, normalizers

    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.prompt_size import max_bytes_per_token

    _, tokenizer = tiny
    spec = json.loads(tokenizer.backend.to_str())
    longest = max(len(t) for t in spec["model"]["vocab"])
    assert max_bytes_per_token(tokenizer) == max(longest, *(len(t["content"]) for t in spec["added_tokens"]))
    for text in ["To be, or not to be", "世界 ✓ Héllo " * 20, "\x00\x01 " * 50, "<|im_end|>" * 30]:
        assert len(tokenizer.encode(text)) >= len(text.encode()) / max_bytes_per_token(tokenizer)

    def variant(**changes) -> TextTokenizer:
        backend = Tokenizer.from_str(tokenizer.backend.to_str())
        for name, value in changes.items():
            setattr(backend, name, value)
        return TextTokenizer(backend, tokenizer.config)

    assert max_bytes_per_token(variant(normalizer=normalizers.NFC())) == 3 * max_bytes_per_token(tokenizer)
    assert max_bytes_per_token(variant(normalizer=normalizers.Strip())) is None  # drops text
    lstrip = json.loads(tokenizer.backend.to_str())
    lstrip["added_tokens"][0]["lstrip"] = True  # swallows the whitespace before it, however much
    assert max_bytes_per_token(TextTokenizer(Tokenizer.from_str(json.dumps(lstrip)), tokenizer.config)) is None


# -- chat templates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'A' * 3000000000 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
])
def test_a_template_over_budget_is_refused_at_start(tiny, template):
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app
    from lmforge.serve.settings import ServeSettings

    model, tokenizer = tiny
    hostile = TextTokenizer(tokenizer.backend, {**tokenizer.config, "chat_template": template})
    started = time.monotonic()
    with pytest.raises(LmforgeError, match="refusing the model's chat template"):
        create_app(Engine(model, hostile), ServeSettings(model_name=MODEL))
    assert time.monotonic() - started < 5


def test_a_template_over_budget_for_one_request_is_that_requests_400(start_server, tiny):
    """This template is quadratic in a message's length: fine for short chats, over its step
    budget for a long one. That request alone is refused; the server goes on, quickly."""
    from lmforge.data.tokenizer import DEFAULT_CHAT_TEMPLATE, TextTokenizer

    _, tokenizer = tiny
    quadratic = ("{% for m in messages %}{% for a in m.content %}{% for b in m.content %}{% endfor %}{% endfor %}"
                 "{% endfor %}" + DEFAULT_CHAT_TEMPLATE)
    url = start_server(tokenizer=TextTokenizer(tokenizer.backend, {**tokenizer.config,
                                                                   "chat_template": quadratic})).url
    long = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Who is Romeo? " * 400}]}
    results: list[httpx.Response] = []

    def hostile_requests():
        with ThreadPoolExecutor(4) as pool:
            results.extend(pool.map(lambda _: post_raw(url, long, "/v1/chat/completions"), range(8)))

    latencies = health_latencies_while(url, hostile_requests)
    for r in results:
        assert r.status_code == 400, r.text
        error = r.json()["error"]  # over its steps, or (four renders sharing the GIL) over its second
        assert error["code"] == "chat_template_budget" and re.search(r"steps|longer than 1 s", error["message"])
    assert max(latencies) < 0.75, latencies
    short = post_raw(url, {**long, "messages": [{"role": "user", "content": "Who is Romeo?"}]}, "/v1/chat/completions")
    assert short.status_code == 200 and short.json()["choices"][0]["message"]["role"] == "assistant"


# -- connections ------------------------------------------------------------------------------------
def test_slow_headers_slow_bodies_and_idle_connections_are_closed(start_server):
    server = start_server(header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0)
    partial_head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with ThreadPoolExecutor(40) as pool:
        slow = [pool.submit(exchange, server.port, partial_head) for _ in range(30)]
        silent = [pool.submit(exchange, server.port, b"") for _ in range(5)]
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}  # others still served
        slow_results, silent_results = [f.result() for f in slow], [f.result() for f in silent]
    for response, elapsed in slow_results:
        assert 0.9 < elapsed < 3.0
        status, body = status_and_json(response)
        assert status == 408 and body["error"]["code"] == "request_timeout"
    for response, elapsed in silent_results:  # nothing sent: closed without a word
        assert response == b"" and 0.9 < elapsed < 3.0
    # A whole head whose body never comes: the app's 408, in the API's error shape.
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
    response, elapsed = exchange(server.port, head)
    status, body = status_and_json(response)
    assert status == 408 and "body did not arrive within 1 s" in body["error"]["message"] and elapsed < 3.0
    # A kept-alive connection is closed once idle for keep_alive_timeout.
    response, elapsed = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200") and 0.9 < elapsed < 3.0


def test_connections_beyond_the_cap_are_answered_503(start_server):
    server = start_server(max_connections=4)
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        response, _ = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, body = status_and_json(response)
        assert status == 503 and body["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").status_code != 200:  # the slots free as they close
        assert time.monotonic() < deadline
        time.sleep(0.05)


# -- the Host header ----------------------------------------------------------------------------------
def host_status(port: int, host: str) -> tuple[int, dict]:
    request = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    return status_and_json(exchange(port, request.encode())[0])


def test_a_loopback_server_answers_loopback_host_names_only(server, start_server):
    """DNS rebinding: a page on attacker.example points its name at 127.0.0.1 and its
    requests then reach a loopback server, carrying Host: attacker.example."""
    port = server.port
    for host in ["attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "0.0.0.0"]:
        status, body = host_status(port, host)
        assert status == 400 and body["error"]["code"] == "invalid_host", host
    for host in [f"127.0.0.1:{port}", "localhost", f"LOCALHOST.:{port}", f"[::1]:{port}", "127.0.0.2",
                 "chat.localhost"]:
        assert host_status(port, host)[0] == 200, host
    named = start_server(allowed_hosts=["llm.example.com"]).port
    assert host_status(named, "llm.example.com:443")[0] == 200
    assert host_status(named, f"localhost:{named}")[0] == 200
    assert host_status(named, "attacker.example")[0] == 400
    assert host_status(start_server(allowed_hosts=["*"]).port, "attacker.example")[0] == 200


def test_host_check_rules():
    from lmforge.serve.security import host_allowed

    assert not host_allowed("evil.example", "127.0.0.1", [])
    assert not host_allowed("evil.example", "::ffff:127.0.0.1", [])
    assert host_allowed("evil.example", "10.0.0.5", [])  # not a loopback connection: keys guard it
    assert not host_allowed("evil.example", "10.0.0.5", ["llm.example.com"])
    assert host_allowed("LLM.example.com.", "10.0.0.5", ["llm.example.com"])
    assert host_allowed(None, "127.0.0.1", [])  # HTTP/1.0 without Host: not a browser


# -- the queue --------------------------------------------------------------------------------------
def test_the_queue_full_message_gives_the_real_numbers(start_server):
    url = start_server(max_batch=1, max_queue=2).url
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 100}
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60),
                                range(10)))
    refusals = [r.json()["error"]["message"] for r in results if r.status_code == 503]
    assert refusals and len(refusals) <= 7
    for message in refusals:
        m = re.search(r"(\d+) of 1 batch slots and (\d+) of 2 queue places are taken", message)
        assert m and m.groups() == ("1", "2"), message


# -- files a model directory links to ---------------------------------------------------------------------
def test_links_out_of_a_model_directory_are_refused(tiny_model_dir, tmp_path):
    import lmforge
    from lmforge.interop.convert import import_model

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]  # then chat_template.jinja is the template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").symlink_to(secret)
    for load in (lambda: lmforge.load(model), lambda: import_model(model, tmp_path / "imported")):
        with pytest.raises(LmforgeError, match="chat_template.jinja is a link to .*secret.txt, outside the model"):
            load()
    assert not (tmp_path / "imported").exists()
    (model / "chat_template.jinja").unlink()
    (model / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (model / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(LmforgeError, match="tokenizer.json is a link"):
        lmforge.load(model)
    # Links inside the directory, and weights linked from elsewhere (a download cache), load.
    (model / "tokenizer.json").unlink()
    (model / "files").mkdir()
    (tmp_path / "tokenizer.json").rename(model / "files" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to(os.path.join("files", "tokenizer.json"))
    (model / "model.safetensors").rename(tmp_path / "weights.safetensors")
    (model / "model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    loaded = lmforge.load(model)
    assert loaded.tokenizer.encode("To be") == lmforge.load(tiny_model_dir).tokenizer.encode("To be")
