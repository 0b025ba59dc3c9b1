"""`lmforge serve --tp 2` when rank 0 fails alone: every process ends within a bound, with one line
of error and no traceback (torchrun's own failure report left out).

Out of memory in rank 0's forward, while rank 1 waits in the same forward's collectives, is
simulated by a test-only `sitecustomize` put on the ranks' PYTHONPATH by this file (no hook in
lmforge): on rank 0 only, attention over more than 24 tokens raises torch.OutOfMemoryError.
torchrun's own report of a failed rank (what a port already taken, rank 0's alone, showed after
uvicorn's one line) is left out by lmforge.train.torchrun: checked without a model."""

from __future__ import annotations

import contextlib
import os
import signal
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


def kill(proc: subprocess.Popen) -> None:
    """End the command and whatever it started, if still running (a failed check leaves nothing behind)."""
    if proc.poll() is None:
        for pid in reversed(tree(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


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
        pytest.fail(f"serve --tp 2 still running {within:.0f} s after rank 0 failed")


def assert_one_error_line(err: str, wanted: str) -> None:
    assert "Traceback" not in err and "ChildFailedError" not in err and "Root Cause" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # lmforge's one-line errors
    assert len(errors) == 1 and wanted in errors[0], err[-3000:]


def test_rank0_out_of_memory_in_a_forward_stops_every_rank_with_one_line(tiny_model_dir, tmp_path, wait_healthy):
    (tmp_path / "sitecustomize.py").write_text(RANK0_OUT_OF_MEMORY)
    port = free_port()
    proc = start(tiny_model_dir, port, {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=180)
        check_rank0_out_of_memory(proc, url, tiny_model_dir.name)
    finally:
        kill(proc)


def check_rank0_out_of_memory(proc: subprocess.Popen, url: str, model: str) -> None:
    processes = tree(proc.pid)
    assert len(processes) >= 4, processes  # this command, torchrun and its two ranks

    def complete(prompt: str) -> httpx.Response:
        return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
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


RANK_1_FAILS = """\
import os, signal, sys, time
if os.environ["RANK"] == "1":
    if sys.argv[1] == "error":
        print("error: rank 1 cannot go on", file=sys.stderr)
        sys.exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


@pytest.mark.parametrize(("how", "status", "line"), [("error", 3, "error: rank 1 cannot go on"),
                                                      ("killed", 1, "error: rank 1 was killed by SIGKILL")])
def test_torchrun_leaves_a_failed_rank_one_line(tmp_path, how, status, line):
    """What a port already taken showed: the rank's own line, then torchrun's traceback and table."""
    (tmp_path / "ranks.py").write_text(RANK_1_FAILS)
    proc = subprocess.run([sys.executable, "-m", "lmforge.train.torchrun", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "ranks.py"), how], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status and proc.stderr.strip() == line, proc.stderr[-3000:]
