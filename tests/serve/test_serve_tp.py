"""`lmforge serve MODEL --tp 2`: one model split over 2 CPU processes (gloo) behind one HTTP server.

The real command runs (it re-runs itself under torchrun); its answers are compared over HTTP with
those of the same model served whole, in-process, through the same engine on the PyTorch path:
greedy completions and chats, 4 requests at once, a prompt that hits the prefix cache, and
embeddings. A malformed request gets its 4xx and the server goes on; SIGTERM stops every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import KEY, Server, free_port

pytestmark = pytest.mark.slow

PROMPTS = ["Chapter 1. The queen", "2. A fool and his", "ROMEO: But soft, what light", "你好, the model 世界 and"]


def descendants(pid: int) -> set[int]:
    """The processes started (directly or not) by `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM (which the command passes on to torchrun and its ranks; a SIGKILL would orphan them), then its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


@pytest.fixture(scope="module")
def split_server(tiny_model_dir, tmp_path_factory, wait_healthy):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEY + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(tiny_model_dir), "--port", str(port),
                             "--api-key-file", str(keys), "--tp", "2", "--max-batch", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=180)
    yield proc, url
    if proc.poll() is None:
        stop(proc)


@pytest.fixture(scope="module")
def whole_server(tiny_model_dir):
    import lmforge
    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app
    from lmforge.serve.security import ApiKeys
    from lmforge.serve.settings import ServeSettings

    m = lmforge.load(tiny_model_dir)
    engine = Engine(m.model, m.tokenizer, max_batch=4, native=False)
    settings = ServeSettings(model_name=tiny_model_dir.name, api_keys=ApiKeys([KEY]))
    with Server(create_app(engine, settings, [tiny_model_dir])) as server:
        yield server.url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def completion(url: str, model: str, prompt: str, max_tokens: int = 16) -> str:
    r = post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_split_server_answers_as_the_whole_model(split_server, whole_server, tiny_model_dir):
    proc, url = split_server
    model = tiny_model_dir.name
    for prompt in PROMPTS[:2]:
        assert completion(url, model, prompt) == completion(whole_server, model, prompt)
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Who is the queen?"}]
    chats = [post(u, "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 8,
                                                 "temperature": 0}) for u in (url, whole_server)]
    assert [c.status_code for c in chats] == [200, 200], chats[0].text
    assert chats[0].json()["choices"][0]["message"] == chats[1].json()["choices"][0]["message"]

    # four at once: they share decoding steps (and slots of the split cache), while an embeddings
    # request runs the model from another thread
    wanted = [completion(whole_server, model, p, 12) for p in PROMPTS]
    embed = {"model": model, "input": PROMPTS[:2]}
    with ThreadPoolExecutor(5) as pool:
        vectors = pool.submit(post, url, "/v1/embeddings", embed)
        got = list(pool.map(lambda p: completion(url, model, p, 12), PROMPTS))
    assert got == wanted
    whole_vectors = post(whole_server, "/v1/embeddings", embed).json()["data"]
    for a, b in zip(vectors.result().json()["data"], whole_vectors):
        assert max(abs(x - y) for x, y in zip(a["embedding"], b["embedding"])) < 1e-5

    # a prompt of more than one prefix-cache block, twice: the second copies the cached block on both ranks
    long_prompt = "To be, or not to be, that is the question: whether tis nobler in the mind"
    first, second = completion(url, model, long_prompt, 8), completion(url, model, long_prompt, 8)
    assert first == second == completion(whole_server, model, long_prompt, 8)
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    hits = [line for line in metrics.splitlines() if "prefix" in line and "hit" in line and not line.startswith("#")]
    assert hits and float(hits[0].split()[-1]) > 0, hits


def test_bad_requests_get_4xx_and_the_ranks_go_on(split_server, whole_server, tiny_model_dir):
    proc, url = split_server
    model = tiny_model_dir.name
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert httpx.post(url + "/v1/completions", content=b'{"prompt": "x", "max_tok', headers=auth).status_code == 400
    assert post(url, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": -3}).status_code == 400
    too_long = post(url, "/v1/completions", {"model": model, "prompt": "the queen " * 200, "max_tokens": 4})
    assert too_long.status_code == 400, too_long.text
    assert completion(url, model, PROMPTS[0]) == completion(whole_server, model, PROMPTS[0])
    assert proc.poll() is None


def test_sigterm_stops_every_rank(split_server):
    proc, url = split_server
    ranks = descendants(proc.pid)
    assert len([p for p in ranks if alive(p)]) >= 3, ranks  # torchrun and its 2 workers
    err = stop(proc)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in ranks if alive(p)], err[-3000:]
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]  # a stop asked for, not a failure
    assert "serving" in err and "split over the --tp processes" in err


@pytest.mark.parametrize("flags,message", [
    (["--tp", "0"], "--tp must be at least 1"),
    (["--tp", "2", "--speculative", "ngram"], "--tp does not support --speculative yet"),
    (["--tp", "2", "--adapter", "some-adapter"], "--tp does not support --adapter yet"),
    (["--tp", "2", "--ray"], "--tp does not support --ray yet"),
])
def test_what_tp_refuses_is_one_line(tiny_model_dir, monkeypatch, capsys, flags, message):
    from lmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["lmforge", "serve", str(tiny_model_dir), *flags])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "\n" not in err, err
