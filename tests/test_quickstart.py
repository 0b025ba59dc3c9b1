"""`lmforge quickstart --corpus` on a user's own corpus: folders named after it, and sample
prompts and hints taken from it (not Shakespeare's)."""

from __future__ import annotations

import ast
import json
import random
import shlex

import pytest

import lmforge
from lmforge.quickstart import corpus_name, corpus_prompts, opening_words

SUBJECTS = ["机器学习", "深度学习", "模型量化", "分词器", "数据清洗", "模型评估", "连续批处理", "注意力机制", "优化器",
            "学习率调度", "检查点", "知识蒸馏"]


def article(subject: str, rng: random.Random) -> str:
    """A short Chinese technical article with English terms, as a user's corpus holds."""
    lines = [f"{subject}入门（第 {rng.randint(1, 99)} 讲）"]
    for j in range(12):
        year, share, n = rng.randint(2015, 2025), rng.randint(3, 60), rng.randint(2, 512)
        lines.append(rng.choice([
            f"在 {year} 年的实验中，{subject}让验证集上的困惑度下降了 {share}%，批大小为 {n}。",
            f"{subject}的第 {j + 1} 个要点：先用 PyTorch 写出参考实现，再比较 {n} 个样本上的误差。",
            f"很多团队把{subject}和 Transformer 一起使用，{year} 年以后这种做法占到了 {share}%。",
            f"如果显存只有 {n} MB，{subject}通常要配合 LoRA 或者 int4 量化才能运行。",
        ]))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("corpus", "name"), [
    ("my/*.txt", "my"), ("my/", "my"), ("data/zh_*.jsonl", "data-zh"), ("文章/*.jsonl", "文章"), ("*.txt", "corpus"),
    ("x/**/*.md", "x"), ("web pages/news&blogs.jsonl", "news-blogs"), ("zh/新闻 2024/*.txt", "新闻-2024"),
])
def test_corpus_folder_names(corpus, name):
    assert corpus_name(corpus) == name


@pytest.mark.parametrize(("text", "prompt"), [
    ("ROMEO:\nBut soft, what light", "ROMEO:"),
    ("The quick brown fox jumps over the lazy dog", "The quick brown fox"),
    ("机器学习是人工智能的一个分支。深度学习", "机器学习是人工智"),
    ("\n\n深度学习模型（例如 Transformer）先在大量文本上预训练", "深度学习模型（例如"),
    ("\ufffd\ufffdhello world", "hello world"),
])
def test_opening_words(text, prompt):
    assert opening_words(text) == prompt


def write_corpus(folder, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    texts = [article(subject, rng) for subject in SUBJECTS]
    for i, text in enumerate(texts):
        (folder / f"文章{i:02d}.txt").write_text(text, encoding="utf-8")
    return texts


def line_openings(texts) -> set[str]:
    return {opening_words(line) for text in texts for line in text.splitlines() if line.strip()}


def test_prompts_are_openings_of_held_out_documents(tmp_path):
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenizer import TextTokenizer

    texts = write_corpus(tmp_path / "语料")
    data = prepare(DataConfig(corpus=str(tmp_path / "语料"), tokenizer=TokenizerConfig(vocab_size=400)),
                   tmp_path / "data")
    prompts = corpus_prompts(data, TextTokenizer.load(data))
    assert len(prompts) == 3 and len(set(prompts)) == 3
    # Each document's held-out part is its last line (prepare's split): the prompts open those.
    assert set(prompts) <= {opening_words(text.splitlines()[-1]) for text in texts}, prompts


@pytest.mark.slow
def test_quickstart_on_a_chinese_glob(cli, tmp_path, monkeypatch):
    write_corpus(tmp_path / "我的语料")
    monkeypatch.setenv("COLUMNS", "40")  # model text still one line each
    proc = cli("quickstart", "--minutes", "0.05", "--corpus", "我的语料/*.txt", "--out", "out", "--no-progress",
               timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "clean").iterdir()) == ["我的语料"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["我的语料-v2048"]
    for shakespeare in ("ROMEO", "To be, or not", "The king"):
        assert shakespeare not in proc.stdout
    cleaned = [json.loads(line)["text"] for part in (out / "clean" / "我的语料").glob("*.jsonl")
               for line in part.read_text(encoding="utf-8").splitlines()]
    assert len(cleaned) == len(SUBJECTS)
    lines = proc.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("4. samples")))
    samples = lines[at + 1:at + 4]
    prompts = [ast.literal_eval(line.split(" -> ")[0].strip()) for line in samples]
    assert set(prompts) <= line_openings(cleaned) and len(set(prompts)) == 3, samples
    texts = lmforge.load(out / "quickstart" / "model").generate(prompts, max_new_tokens=48, temperature=0.8,
                                                                 top_k=50, seed=0)
    assert samples == [f"   {p!r} -> {t!r}" for p, t in zip(prompts, texts)]
    hints = proc.stdout[proc.stdout.index("Next:"):]
    assert f"--prompt {shlex.quote(prompts[0])}" in hints
    assert f"--data.corpus {shlex.quote('out/clean/我的语料')}" in hints
    request = next(line for line in hints.splitlines() if "curl" in line).split(" -d ")[1]
    assert json.loads(request.strip("'"))["prompt"] == prompts[0]
