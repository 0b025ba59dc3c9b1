"""The whole pipeline on Chinese web text, through the CLI as a user runs it:
clean -> prepare -> pretrain -> SFT chat -> quantize -> serve a Chinese chat request.

The corpus is Chinese technical articles with English terms and boilerplate tails, in JSONL
with ids and urls (tests/user_data.py). Each stage's text must survive exactly: cleaning keeps
the records' fields and the articles' bodies, the tokenizer decodes what it encodes, and the
server's answer, streamed or not, is the same text with no broken characters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_readme_tour import free_port
from user_data import CHINESE_ARTICLES, chinese_chat_records, web_records, write_jsonl

RECIPE = """\
model: {family: llama, n_layer: 2, n_head: 4, n_kv_head: 2, d_model: 64, context: 128}
data: {dir: data/zh}
train: {batch_size: 8, lr: 3.0e-3, warmup: 5, max_steps: 60, checkpoint_every: 60, log_every: 10, dtype: float32}
eval: {every: 30, batches: 2}
run: {name: zh, out: runs}
"""
QUESTION = "什么是学习率预热？"


def lmforge(work: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"lmforge {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def post(url: str, body: dict, stream: bool = False):
    request = urllib.request.Request(url, data=json.dumps(body, ensure_ascii=False).encode(), method="POST",
                                     headers={"Content-Type": "application/json; charset=utf-8"})
    response = urllib.request.urlopen(request, timeout=60)
    if not stream:
        with response:
            return json.load(response)
    deltas = []
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["delta"].get("content") or "")
    return deltas


@pytest.mark.slow
def test_chinese_pipeline_end_to_end(tmp_path, wait_healthy):
    from lmforge.data.tokenizer import TextTokenizer

    work = tmp_path
    env = dict(os.environ, LMFORGE_CACHE=str(tmp_path / "cache"), COLUMNS="60")
    records = [r for r in web_records() if r["id"].startswith("zh-")]
    # more Chinese text for the tokenizer and the model: each article again, under new ids
    records += [dict(r, id=r["id"] + "-b", text=r["text"].replace("。", "。\n")) for r in records]
    write_jsonl(work / "raw" / "zh.jsonl", records)

    lmforge(work, env, "data", "clean", "raw/zh.jsonl", "--out", "clean", "--languages", "zh")
    kept = [json.loads(line) for f in sorted((work / "clean").glob("*.jsonl*")) for line in _lines(f)]
    by_id = {r["id"]: r for r in kept}
    for article, record in zip(CHINESE_ARTICLES, records):
        assert record["id"] in by_id, f"{record['id']} was removed"
        out = by_id[record["id"]]
        assert out["url"] == record["url"] and out["meta"] == record["meta"]
        assert article.split("\n")[-1] in out["text"]  # the article's body survives
        assert "版权所有" not in out["text"] and "相关文章" not in out["text"]  # its boilerplate does not

    lmforge(work, env, "data", "prepare", "clean", "--out", "data/zh", "--vocab-size", "1024")
    tokenizer = TextTokenizer.load(work / "data" / "zh" / "tokenizer.json")
    for article in CHINESE_ARTICLES:
        assert tokenizer.decode(tokenizer.encode(article)) == article

    (work / "zh.yaml").write_text(RECIPE)
    lmforge(work, env, "train", "zh.yaml", "--no-progress")
    losses = [json.loads(line)["loss"] for line in (work / "runs" / "zh" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.5, losses

    write_jsonl(work / "chat.jsonl", chinese_chat_records(repeat=4))
    lmforge(work, env, "finetune", "runs/zh/model", "--data", "chat.jsonl", "--task", "sft", "--method", "full",
            "--name", "zh-sft", "--train.max_steps", "80", "--train.lr", "2e-3", "--eval.every", "80", "--no-progress")
    lmforge(work, env, "quantize", "runs/zh-sft/model", "--method", "int8", "--out", "models/zh-int8")

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "models/zh-int8", "--port", str(port)],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        body = {"model": "zh-int8", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40,
                "temperature": 0}
        whole = post(url + "/v1/chat/completions", body)
        text = whole["choices"][0]["message"]["content"]
        streamed = post(url + "/v1/chat/completions", dict(body, stream=True), stream=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert text and "\ufffd" not in text
    assert "".join(streamed) == text
    assert all("\ufffd" not in d for d in streamed)  # no delta ends inside a character
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text  # it answers in Chinese


def _lines(path: Path) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]
