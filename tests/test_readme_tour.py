"""The README's CLI tour runs as written, command by command, in order, in one fresh directory.

What a user would bring is made first, shaped like users' files: web pages in gzipped JSONL
with ids, urls and boilerplate (English and Chinese), a recipe `my.yaml`, chat data, an API key
file, a Hugging Face Qwen2 checkpoint in `~/hf/Qwen2-0.5B` (tiny and random: nothing can be
downloaded here), a text file and a multiple-choice task file. Durations are scaled down
(`SCALED`); nothing else about a command changes. `serve` is started, answers one
authenticated completion and is stopped; `chat` gets one line on stdin.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from user_data import chinese_chat_records, write_jsonl, write_web_jsonl_gz

README = Path(__file__).resolve().parents[1] / "README.md"

# The tour's long runs, shortened for a test (the command is otherwise the README's).
SCALED = [
    ("lmforge quickstart --minutes 3", "lmforge quickstart --minutes 0.2"),
    ("--trials 40", "--trials 2"),
]
# Options appended to keep a command short or off the shared port.
APPENDED = {
    "lmforge finetune": "--train.max_steps 4 --eval.every 2",
    "lmforge hpo": "--train.max_steps 20 --eval.every 10",
}

MY_RECIPE = """\
model: {family: llama, n_layer: 2, n_head: 2, n_kv_head: 1, d_model: 32, context: 32}
data: {corpus: synthetic, tokenizer: {vocab_size: 512}}
train: {batch_size: 4, lr: 3.0e-3, warmup: 10, max_steps: 100, checkpoint_every: 50, log_every: 10}
eval: {every: 50, batches: 2}
run: {name: my, out: runs}
"""
SPACE = """\
train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
model.n_layer: {type: int, low: 1, high: 2}
"""
TASK = [
    {"context": "Question: Which format does llama.cpp read?\nAnswer:", "choices": [" GGUF", " JPEG", " MP3"], "gold": 0},
    {"context": "Question: What does a tokenizer produce?\nAnswer:", "choices": [" images", " integer ids"], "gold": 1},
    {"context": "量化让模型", "choices": ["更小", "更大"], "gold": 0},
    {"context": "Question: Which optimizer uses first and second moments?\nAnswer:", "choices": [" SGD", " Adam"], "gold": 1},
]


def tour_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## A tour of the CLI", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("lmforge "):
            commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def scaled(command: str) -> str:
    for old, new in SCALED:
        command = command.replace(old, new)
    for prefix, extra in APPENDED.items():
        if command.startswith(prefix + " "):
            command = f"{command} {extra}"
    return command


def make_user_files(work: Path, home: Path) -> None:
    write_web_jsonl_gz(work / "raw" / "crawl-00001.jsonl.gz")
    (work / "my.yaml").write_text(MY_RECIPE)
    (work / "space.yaml").write_text(SPACE)
    write_jsonl(work / "chat.jsonl", chinese_chat_records(repeat=3))
    write_jsonl(work / "tasks" / "mixed.jsonl", TASK)
    (work / "keys.txt").write_text("lmforge-readme-tour-key-0123456789\n")
    (work / "some.txt").write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
                                   "学习率预热让训练更稳定。\n")
    save_tiny_qwen2(home / "hf" / "Qwen2-0.5B")


def save_tiny_qwen2(folder: Path) -> None:
    import torch
    import transformers

    from lmforge.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["To be, or not to be.", "学习率预热让训练更稳定。", "def f(x): return x + 1"] * 30, 320)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(command: str, work: Path, env: dict, wait_healthy) -> None:
    port = free_port()
    proc = subprocess.Popen(["bash", "-c", f"exec {command} --port {port}"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        key = (work / "keys.txt").read_text().split()[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST",
            data=json.dumps({"model": "model", "prompt": "ROMEO:", "max_tokens": 8}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.load(response)
        assert body["choices"][0]["text"] is not None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path, wait_healthy):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    make_user_files(work, home)
    env = dict(os.environ, HOME=str(home), COLUMNS="100", LMFORGE_CACHE=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    commands = tour_commands()
    assert len(commands) >= 20, commands  # the tour was found and read
    for command in map(scaled, commands):
        if command.startswith("lmforge serve "):
            run_serve(command, work, env, wait_healthy)
            continue
        stdin = "学习率预热是什么？\n" if command.startswith("lmforge chat ") else ""
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, input=stdin, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (f"README command failed ({proc.returncode}): {command}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
