"""`lmforge serve` as a user runs it: the console script, a model directory, keys from a file."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest
from serve_helpers import KEY, free_port

from lmforge.errors import LmforgeError
from lmforge.serve.command import serve


def test_serve_command(cli, tiny_model_dir, tmp_path, wait_healthy):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# one key a line\n{KEY}\n")
    port = free_port()
    proc = cli("serve", tiny_model_dir, "--port", port, "--api-key-file", keys, popen=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
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
