"""`lmforge serve` as a user runs it: the console script, a model directory, keys from a file."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import openai
import pytest
from serve_helpers import KEY

from lmforge.errors import LmforgeError
from lmforge.serve.command import serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(cli, tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# one key a line\n{KEY}\n")
    port = free_port()
    proc = cli("serve", tiny_model_dir, "--port", port, "--api-key-file", keys, popen=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        assert model == tiny_model_dir.name
        r = client.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens <= 4
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert KEY not in err  # the access log names keys by digest only
    assert '"path": "/v1/completions"' in err
    assert "decoding: native fast path" in err


def test_serve_refuses_unsafe_or_broken_setups(tiny_model_dir, tmp_path, monkeypatch):
    """Each refusal comes before anything listens (in-process: a subprocess each would cost seconds)."""
    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)

    def refused(match: str, model=tiny_model_dir, host="127.0.0.1", keys=None):
        with pytest.raises(LmforgeError, match=match):
            serve(model, host, 0, keys, allow_no_auth=False, settings={})

    refused("without API keys", host="0.0.0.0")
    refused("cannot read the API key file", keys=tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    refused("shorter than", keys=short)
    refused("not found", model=tmp_path / "no-model")
    monkeypatch.setenv("LMFORGE_API_KEYS", KEY)
    refused("not found", model=tmp_path / "no-model", host="0.0.0.0")  # keys from the environment suffice
