"""Shared fixtures: a private cache, one tiny prepared dataset per session, tiny models.

Everything here is small on purpose (d_model 32-64, 1-2 layers, context 32-64): the tests
built on these fixtures need about 1.5 CPU-minutes in all, most of it the few that run the
console script. Tests never touch the network: the `synthetic` corpus is generated in code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge import native
from lmforge.config import MOE_FAMILIES, DataConfig, ModelConfig, TokenizerConfig, deep_merge, load_recipe
from lmforge.data.prepare import prepare
from lmforge.data.tokenizer import TextTokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir

DATA_VOCAB = 512  # the `tiny` recipe's vocabulary, so its runs reuse the session's prepared data


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Corpora and downloads go to a throwaway cache (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("lmforge-cache")
    previous = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("LMFORGE_CACHE", None)
    else:
        os.environ["LMFORGE_CACHE"] = previous


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    fields = dict(family=family, vocab_size=320, n_layer=2, n_head=4, d_model=32, context=32)
    if family != "gpt2":
        fields["n_kv_head"] = 2
    if family in MOE_FAMILIES:
        fields["n_experts"] = 4
    if family == "qwen2_moe":
        fields["moe_shared_d_ff"] = 48
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def make_config():
    """make_config(family, **overrides) -> a tiny ModelConfig (vocab 320, 2 layers, d_model 32, context 32)."""
    return tiny_config


@pytest.fixture
def make_model():
    """make_model(family, seed=0, **config overrides) -> a tiny Transformer in eval mode."""

    def build(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(tiny_config(family, **overrides)).eval()

    return build


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The synthetic corpus prepared once: tokenizer.json, train/val shards, index.json."""
    cfg = DataConfig(corpus="synthetic", tokenizer=TokenizerConfig(vocab_size=DATA_VOCAB))
    return prepare(cfg, tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="session")
def tokenizer(tiny_data) -> TextTokenizer:
    return TextTokenizer.load(tiny_data)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data, tokenizer, tmp_path_factory) -> Path:
    """A randomly initialized llama-family model directory with the session's tokenizer."""
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size, context=64))
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def long_model_dir(tiny_data, tokenizer, tmp_path_factory) -> Path:
    """The same kind of model with room for long prompts and outputs (context 1024)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size, context=1024))
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama-1024")


def build_tiny_recipe(data_dir: Path, out: Path, name: str = "run", **sections):
    """The `tiny` recipe, shrunk further, writing runs under `out` and reusing prepared `data_dir`."""
    base = {
        "model": {"n_layer": 1, "d_model": 32, "context": 32},
        "data": {"dir": str(data_dir)},
        # fp32: tests compare runs to 1e-5, which bf16 autocast (train.dtype auto on a CPU
        # with AVX512-BF16) does not hold; bf16 has its own tests.
        "train": {"batch_size": 4, "max_steps": 6, "warmup": 2, "checkpoint_every": 3, "log_every": 1,
                  "dtype": "float32"},
        "eval": {"every": 1000, "batches": 2},
        "run": {"name": name, "out": str(out)},
    }
    return load_recipe("tiny", deep_merge(base, sections))


@pytest.fixture
def tiny_recipe(tiny_data, tmp_path):
    """tiny_recipe(name="run", **sections) -> a seconds-long recipe writing under tmp_path/runs.

    It reuses the session's prepared data (same data settings), so a run costs only its steps.
    """
    return lambda name="run", **sections: build_tiny_recipe(tiny_data, tmp_path / "runs", name, **sections)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """One short real training run (a few seconds), shared: its loss curve and its model directory."""
    from lmforge.train.trainer import train

    recipe = build_tiny_recipe(tiny_data, tmp_path_factory.mktemp("trained"), "trained",
                               model={"d_model": 64, "n_head": 4, "n_kv_head": 2},
                               train={"batch_size": 8, "max_steps": 30, "warmup": 5, "lr": 1e-2,
                                      "checkpoint_every": 30, "log_every": 5},
                               eval={"every": 30, "batches": 4})
    return train(recipe, progress=False, log=lambda s: None)


LMFORGE = Path(sys.executable).with_name("lmforge")


@pytest.fixture
def cli(tmp_path):
    """cli(*args) runs the installed `lmforge` console script in tmp_path; popen=True starts it instead."""

    def run(*args, timeout: float = 300, popen: bool = False):
        env = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [str(LMFORGE), *map(str, args)]
        if popen:
            return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def lmforge_main(monkeypatch, capsys):
    """lmforge_main(*args) -> (exit code, stdout, stderr), running `main()` as the console script would,
    in this process (a refusal through the console script costs seconds of start-up)."""
    from lmforge.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["lmforge", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    return run


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Returns once the server `proc` started answers 200 on `url`/health. Fails with the server's
    output if it exits first, or if it does not answer within `timeout` seconds (then stopped with
    SIGTERM, which `lmforge serve` passes on to torchrun's ranks, to read that output)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}) before answering /health:\n{process_output(proc)}")
        if time.monotonic() > deadline:
            proc.terminate()
            pytest.fail(f"the server did not answer /health within {timeout:.0f} s:\n{process_output(proc)}")
        time.sleep(0.1)


def process_output(proc: subprocess.Popen, tail: int = 3000) -> str:
    """The last `tail` characters of what a finished (or stopping) process wrote."""
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return ((out or "") + (err or ""))[-tail:]


@pytest.fixture(scope="session", name="wait_healthy")
def wait_healthy_fixture():
    """wait_healthy(url, proc, timeout=120): returns once the server `proc` answers /health (see above)."""
    return wait_healthy


@pytest.fixture
def use_kernels(monkeypatch):
    """`use_kernels(arch)`: the native kernels built for -march=arch, in place of the default ones
    for this test (how the tests run the AVX2 build on an AVX-512 machine)."""

    def use(arch: str):
        if "avx2" not in open("/proc/cpuinfo").read():
            pytest.fail("the native kernels need an x86 CPU with AVX2")
        path = native.build(arch)
        assert path is not None, f"the kernels did not build for -march={arch}"
        loaded = native.load(path)
        monkeypatch.setattr(native, "kernels", lambda: loaded)
        return loaded

    return use
