"""`lmforge serve --tp 2` when rank 0 fails alone: every process ends within a bound, with one line
of error and no traceback (torchrun's own failure report left out).

Out of memory in rank 0's forward, while rank 1 waits in the same forward's collectives, is
simulated by a test-only `sitecustomize` put on the ranks' PYTHONPATH by this file (no hook in
lmforge): on rank 0 only, attention over more than 24 tokens raises torch.OutOfMemoryError.
A port already taken is a real failure of rank 0 alone (it alone binds the port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port

from lmforge.train.distributed import child_processes

pytestmark = pytest.mark.slow

RANK0_OUT_OF_MEMORY = """\
# test-only, from tests/serve/test_serve_tp_failure.py: rank 0's attention runs out of memory on long prompts
import os

if os.environ.get("RANK") == "0":
    import torch

    from lmforge.model import fused

    _attention = fused.attention

    def _out_of_memory_on_long_prompts(q, *args, **kwargs):
        if q.shape[-2] > 24:
            raise torch.OutOfMemoryError("simulated: tried to allocate 2.00 GiB for attention")
        return _attention(q, *args, **kwargs)

    fused.attention = _out_of_memory_on_long_prompts
"""


def tree(pid: int) -> list[int]:
    """`pid` and every process it started, directly or not."""
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(child_processes(found[-1]))
    return found


def start(model_dir, port: int, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port), "--tp", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, within: float) -> str:
    """The command's stderr once it has exited by itself within `within` seconds (else the test fails)."""
    try:
        return proc.communicate(timeout=within)[1]
    except subprocess.TimeoutExpired:
        ranks = tree(proc.pid)
        for pid in reversed(ranks):
            os.kill(pid, 9)
        pytest.fail(f"serve --tp 2 still running {within:.0f} s after rank 0 failed: {proc.communicate()[1][-3000:]}")


def assert_one_error_line(err: str, wanted: str) -> None:
    assert "Traceback" not in err and "ChildFailedError" not in err and "Root Cause" not in err, err[-3000:]
    # (the failed request's own log line, "generation failed: ...", is the server's ordinary access log)
    errors = [line for line in err.splitlines() if "error" in line.lower() and not line.startswith(("{", "generation"))]
    assert len(errors) == 1 and wanted in errors[0], err[-3000:]


def test_rank0_out_of_memory_in_a_forward_stops_every_rank_with_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(RANK0_OUT_OF_MEMORY)
    port = free_port()
    proc = start(tiny_model_dir, port, {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the --tp 2 server did not come up: {finish(proc, 30)[-3000:]}")
        time.sleep(0.2)
    processes = tree(proc.pid)
    assert len(processes) >= 4, processes  # this command, torchrun and its two ranks

    def complete(prompt: str) -> httpx.Response:
        return httpx.post(url + "/v1/completions", json={"model": tiny_model_dir.name, "prompt": prompt,
                                                         "max_tokens": 4, "temperature": 0}, timeout=60)

    assert complete("The queen").status_code == 200  # short prompts run on both ranks
    try:
        failed = complete("To be, or not to be, that is the question: whether tis nobler in the mind to suffer")
        assert failed.status_code >= 500 or failed.json()["choices"][0]["finish_reason"] == "error", failed.text
    except httpx.TransportError:  # the server stopped before it answered
        pass
    started = time.monotonic()
    err = finish(proc, 60)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, err[-3000:]
    assert_one_error_line(err, "rank 0 failed in a forward call the other --tp ranks took part in (OutOfMemoryError")
    assert "rank 1" not in err and "rank 0 is gone" not in err, err[-3000:]
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in processes if os.path.exists(f"/proc/{pid}")]


def test_a_port_taken_ends_every_rank_with_uvicorns_one_line(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = start(tiny_model_dir, taken.getsockname()[1])
        err = finish(proc, 180)
    assert proc.returncode != 0
    assert_one_error_line(err, "address already in use")
