"""Load on `lmforge serve` over loopback: 1, 4 and 16 concurrent streaming clients.

The server runs as its own process (as in production; the clients' Python does not share
its interpreter). Every client sends a fixed mix of streaming greedy completions one after
another. Printed per level: aggregate output tokens/s, time to first token and latency
(p50, p99), and the ratio of 16-client to 1-client throughput (the target on a 2-core CPU
with a small model: >= 5x, p99 time to first token < 1 s at 16 clients). Each level's
throughput is its median over `--rounds` rounds, the levels taking turns. The server's CPU
time per token is printed too: on a shared machine it moves less than wall-clock rates.

    python benchmarks/serve_load.py                      # a quickstart-shaped random model (2M)
    python benchmarks/serve_load.py --shape small        # 27M parameters, 8 x 512
    python benchmarks/serve_load.py --model runs/quickstart/model
    python benchmarks/serve_load.py --requests-per-client 2 --levels 1 4 --rounds 1   # a quick look
    python benchmarks/serve_load.py --shape small --emulate-avx2 /work/llama_avx2/lib   # as on an AVX2-only CPU

With `--llama-cpp PYTHON` (an interpreter that has `llama-cpp-python[server]`), the same
model is exported to GGUF (f32, as ours runs) and served by llama.cpp's OpenAI-compatible
server under the same load, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from common import add_emulation_option, emulate_avx2, emulation_report, machine

from lmforge.config import load_recipe
from lmforge.data.corpora import synthetic_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir

PROMPTS = ["ROMEO:\n", "To be, or not to be", "The king is dead", "Now is the winter of our discontent",
           "JULIET:\nO Romeo, Romeo", "Friends, Romans, countrymen", "All the world's a stage", "Once more unto"]
MAX_TOKENS = [32, 64, 96, 128]


class RequestFailed(Exception):
    """A completion request answered with an error status."""


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


# Random-weight models in the quickstart recipe's family and vocabulary. "quickstart" is the
# recipe's own 2M-parameter shape: its 8 MB of weights stay in cache, so one sequence already
# keeps the FMA units busy and a batch has little to share. "small" (27M parameters, 8 x 512)
# streams its weights from memory at batch 1, which a batch then shares. "gpt2-small" is
# GPT-2 small's body (12 x 768, 85M parameters besides the embeddings): a step takes long
# enough that the HTTP side's fixed cost per token matters less.
SHAPES = {"quickstart": {}, "small": {"d_model": 512, "n_layer": 8, "n_head": 8, "n_kv_head": 8, "d_ff": None},
          "gpt2-small": {"d_model": 768, "n_layer": 12, "n_head": 12, "n_kv_head": 12, "d_ff": None}}


def build_model(out: Path, context: int, shape: str = "quickstart") -> Path:
    """A model of the quickstart recipe's family and vocabulary size, with random weights."""
    recipe = load_recipe("quickstart")
    tokenizer = train_tokenizer(synthetic_documents(), vocab_size=recipe.data.tokenizer.vocab_size)
    cfg = recipe.model.model_copy(update={"vocab_size": tokenizer.vocab_size, "context": context, **SHAPES[shape]})
    torch.manual_seed(0)
    return save_model_dir(Transformer(cfg), tokenizer, out / "bench-model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, cmd: list[str], key: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: run `{' '.join(cmd)}` to see why")
        try:
            if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 3 minutes")


def start_lmforge(model: Path, key: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(port), "--max-batch", str(max_batch),
           "--served-model-name", "bench"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, env={**os.environ, "LMFORGE_API_KEYS": key}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, cmd, key)
    return proc, url


def start_llama_cpp(python: str, model: Path, key: str, threads: int | None, tmp: Path) -> tuple[subprocess.Popen, str]:
    gguf = tmp / "model.gguf"
    subprocess.run([sys.executable, "-m", "lmforge", "export", str(model), "--format", "gguf", "--out", str(gguf),
                    "--gguf-type", "f32"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    n_ctx = json.loads((model / "config.json").read_text()).get("max_position_embeddings", 2048)
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads or torch.get_num_threads()),
           "--api_key", key, "--interrupt_requests", "False"]  # queue concurrent requests, do not cut them off
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, cmd, key)
    return proc, url


async def one_request(client: httpx.AsyncClient, model: str, i: int) -> Sample:
    body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RequestFailed(f"{r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            # Parse only what is measured: the first token's arrival and the closing usage.
            if not line.startswith("data: {"):
                continue
            if '"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif '"text": ""' not in line:
                chunks += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    # A server that sends no usage (llama.cpp's) sends one token per chunk.
    return Sample(ttft=(first or end) - start, latency=end - start, tokens=tokens or chunks)


async def run_level(url: str, key: str, model: str, clients: int, per_client: int) -> tuple[float, list[Sample]]:
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as client:
        await one_request(client, model, 0)  # warm-up

        async def worker(c: int) -> list[Sample]:
            return [await one_request(client, model, c * per_client + j) for j in range(per_client)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    samples = [s for r in results for s in r]
    return sum(s.tokens for s in samples) / wall, samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: a quickstart-shaped random model)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="times each level runs, in turns; the median counts")
    ap.add_argument("--context", type=int, default=256, help="context of the built-in model")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="quickstart",
                    help="the built-in model's shape (quickstart: 2M parameters; small: 27M; gpt2-small: 88M)")
    ap.add_argument("--threads", type=int, help="the server's CPU threads (default: torch's choice)")
    ap.add_argument("--llama-cpp", metavar="PYTHON", help="also serve the model with llama.cpp, through this "
                    "interpreter's llama-cpp-python[server]")
    add_emulation_option(ap)
    args = ap.parse_args()
    emulate_avx2(args.emulate_avx2)  # the servers inherit it
    if args.emulate_avx2:
        print(emulation_report(), flush=True)

    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp), args.context, args.shape)
        print(f"# serve_load: {machine()}")
        weights_mb = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e6
        print(f"# model {model} ({weights_mb:.0f} MB of weights), server threads {args.threads or 'default'}, {args.requests_per_client} "
              f"streaming greedy requests per client, max_tokens cycling {MAX_TOKENS}")
        servers = [("lmforge", lambda: start_lmforge(model, key, max(args.levels), args.threads))]
        if args.llama_cpp:
            servers.append(("llama.cpp", lambda: start_llama_cpp(args.llama_cpp, model, key, args.threads, Path(tmp))))
        for name, start in servers:
            proc, url = start()
            try:
                run_levels(name, proc, url, key, args.levels, args.requests_per_client, args.rounds)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run_levels(name: str, proc: subprocess.Popen, url: str, key: str, levels: list[int], per_client: int,
               rounds: int) -> None:
    print(f"## {name}; load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # The levels take turns, round after round, so that a slow spell of the machine (other
    # processes, a noisy host) lands on all of them rather than on one; each level's
    # throughput is the median of its rounds.
    rates: dict[int, list[float]] = {c: [] for c in levels}
    samples: dict[int, list[Sample]] = {c: [] for c in levels}
    cpu: dict[int, float] = dict.fromkeys(levels, 0.0)
    busy: dict[int, float] = dict.fromkeys(levels, 0.0)
    failure = None
    for _ in range(rounds):
        for clients in levels:
            server, client, wall = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
            try:
                rate, got = asyncio.run(run_level(url, key, "bench", clients, per_client))
            except (httpx.HTTPError, RequestFailed) as e:  # a peer server that cannot take the load
                state = f"exited with {proc.poll()}" if proc.poll() is not None else "still running"
                failure = f"{name} failed at {clients} concurrent clients ({type(e).__name__}: {e}; server {state})"
                break
            cpu[clients] += cpu_seconds(proc.pid) - server
            busy[clients] += (time.process_time() - client) / (time.perf_counter() - wall) / rounds
            rates[clients].append(rate)
            samples[clients] += got
        if failure:
            levels = [c for c in levels if rates[c]]  # report what finished
            break
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'lat p99':>8} {'server CPU ms/tok':>18} {'client CPU %':>13}  tok/s per round")
    per_cpu = {}
    for clients in levels:
        got = samples[clients]
        tokens = sum(s.tokens for s in got)
        per_cpu[clients] = tokens / cpu[clients]
        ttft, lat = [s.ttft for s in got], [s.latency for s in got]
        # The load generator is one Python process: when it nears 100% it, not the server, is the limit.
        print(f"{clients:>7} {len(got):>8} {statistics.median(rates[clients]):>8.1f} {pct(ttft, 50):>8.3f}s "
              f"{pct(ttft, 99):>8.3f}s {pct(lat, 50):>7.2f}s {pct(lat, 99):>7.2f}s "
              f"{1000 * cpu[clients] / tokens:>18.2f} {100 * busy[clients]:>12.0f}%  "
              f"{', '.join(f'{r:.0f}' for r in rates[clients])}", flush=True)
    if failure:
        print(failure)
    lo, hi = (min(levels), max(levels)) if levels else (0, 0)
    if lo != hi:
        ratio = statistics.median(rates[hi]) / statistics.median(rates[lo])
        print(f"{name}: throughput ratio {hi} clients / {lo} client: {ratio:.2f}x "
              f"(per server CPU second: {per_cpu[hi] / per_cpu[lo]:.2f}x)")
    print(f"# load average at end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
