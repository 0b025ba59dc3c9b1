"""The command line: the README's commands run through the real console script, and every user
mistake gets one line on stderr and exit code 2, without a traceback or half-written output."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import lmforge
from lmforge.cli import main


def words(text: str) -> str:
    """Output with rich's line wrapping undone (it wraps at 80 columns when not on a terminal)."""
    return " ".join(text.split())


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------- the real console script

def test_help_lists_the_verbs(cli):
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    for verb in ("quickstart", "train", "generate", "chat", "eval", "data"):
        assert verb in proc.stdout


@pytest.mark.slow
def test_quickstart_runs_end_to_end(cli, tmp_path):
    proc = cli("quickstart", "--minutes", "0.1", "--corpus", "synthetic", "--out", tmp_path / "qs", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "qs" / "quickstart"
    assert "unigram baseline" in words(proc.stdout) and "saved and reloaded" in words(proc.stdout)
    assert (run / "metrics.jsonl").is_file() and (run / "latest").resolve().is_dir()
    m = lmforge.load(run / "model")
    assert m.config.family == "llama" and len(m.generate("The king", max_new_tokens=4)) == 1


@pytest.mark.slow
def test_train_generate_eval_and_prepare_commands(cli, tiny_data, tmp_path):
    # `lmforge train tiny`, shortened, on the session's prepared copy of the same data.
    proc = cli("train", "tiny", "--run.out", tmp_path / "runs", "--no-progress", "--data.dir", tiny_data,
               "--train.max_steps", "6", "--eval.every", "3", "--train.checkpoint_every", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: 6 steps" in words(proc.stdout) and "validation loss" in words(proc.stdout)
    model = tmp_path / "runs" / "tiny" / "model"

    proc = cli("generate", model, "--prompt", "1. The king", "--max-tokens", "8", "--seed", "0", "--temperature", "0.8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1. The king")

    proc = cli("eval", model, "--data", tiny_data, "--max-batches", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)

    proc = cli("data", "prepare", "synthetic", "--out", tmp_path / "prepared", "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "prepared" / "index.json").read_text())
    assert index["documents"] == 400 and "400 documents" in words(proc.stdout)


def test_console_script_errors_are_one_line_and_exit_2(cli):
    proc = cli("train", "tiny", "--train.lrr", "1", timeout=120)
    assert proc.returncode == 2
    assert "train.lrr" in one_error_line(proc.stderr)


# ----------------------------------------------------------------------------- mistakes, in-process

@pytest.fixture
def lmforge_main(monkeypatch, capsys):
    """lmforge_main(*args) -> (exit code, stdout, stderr), running `main()` as the console script would."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["lmforge", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    return run


def test_verb_help_lists_options(lmforge_main):
    code, out, _ = lmforge_main("generate", "--help")
    assert code == 0 and "--temperature" in out and "--top-p" in out


def test_generate_a_batch_and_eval_a_text_file(lmforge_main, tiny_model_dir, tmp_path):
    code, out, _ = lmforge_main("generate", tiny_model_dir, "-p", "Chapter 1.", "-p", "2. A fool", "--max-tokens", "4")
    assert code == 0 and "Chapter 1." in out and "2. A fool" in out
    (tmp_path / "some.txt").write_text("Chapter 3.\n1. The queen serves the crown.\n")
    code, out, _ = lmforge_main("eval", tiny_model_dir, "--data", tmp_path / "some.txt")
    assert code == 0 and "bits/byte" in out


def test_missing_model_directory(lmforge_main, tmp_path):
    code, _, err = lmforge_main("generate", tmp_path / "no-such-model", "-p", "x")
    assert code == 2 and "not found" in one_error_line(err)


@pytest.fixture
def broken_model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def break_model(folder, how: str) -> None:
    if how == "missing config.json":
        (folder / "config.json").unlink()
    elif how == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "pickle-only weights":
        torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    elif how == "shapes disagree":
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 48
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how", ["missing config.json", "truncated weights", "pickle-only weights", "shapes disagree"])
def test_broken_model_directory(lmforge_main, broken_model, how):
    break_model(broken_model, how)
    code, _, err = lmforge_main("generate", broken_model, "--prompt", "hi")
    assert code == 2
    one_error_line(err)


def test_prompt_longer_than_the_context(lmforge_main, tiny_model_dir):
    code, _, err = lmforge_main("generate", tiny_model_dir, "--prompt", "The king loves the crown. " * 40)
    assert code == 2 and "context" in one_error_line(err)


def test_bad_sampling_option(lmforge_main, tiny_model_dir):
    code, _, err = lmforge_main("generate", tiny_model_dir, "--prompt", "hi", "--top-p", "0")
    assert code == 2 and "top_p" in one_error_line(err)


@pytest.mark.parametrize(("text", "message"), [("train: {lrr: 1}\n", "train.lrr"), ("model: [1, 2\n", "YAML")])
def test_bad_recipe(lmforge_main, tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = lmforge_main("train", tmp_path / "r.yaml")
    assert code == 2 and message in one_error_line(err)


def test_existing_run_without_resume(lmforge_main, trained_run):
    before = sorted(p.name for p in (trained_run.run_dir / "checkpoints").iterdir())
    code, _, err = lmforge_main("train", trained_run.run_dir / "recipe.yaml", "--no-progress")
    assert code == 2 and "--resume" in one_error_line(err)
    assert sorted(p.name for p in (trained_run.run_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("case", ["missing", "empty", "non-utf8", "vocab too small"])
def test_bad_corpus_leaves_nothing_behind(lmforge_main, tmp_path, case):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    vocab = "512"
    if case == "missing":
        corpus = tmp_path / "nowhere.txt"
    elif case == "empty":
        (corpus / "a.txt").write_text("")
    elif case == "non-utf8":
        (corpus / "a.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    else:
        (corpus / "a.txt").write_text("plenty of text\n" * 20)
        vocab = "100"
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = lmforge_main("data", "prepare", corpus, "--out", out / "prepared", "--vocab-size", vocab)
    assert code == 2
    one_error_line(err)
    assert list(out.iterdir()) == []


def test_eval_of_a_missing_file(lmforge_main, tiny_model_dir, tmp_path):
    code, _, err = lmforge_main("eval", tiny_model_dir, "--data", tmp_path / "nothing.txt")
    assert code == 2 and "not found" in one_error_line(err)


@pytest.mark.parametrize("case", ["empty corpus", "no gpu"])
def test_train_mistakes_leave_no_files(lmforge_main, tmp_path, case):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("" if case == "empty corpus" else "1. The king loves the sea.\n" * 50)
    extra = ["--train.device", "cuda"] if case == "no gpu" else []
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    runs = tmp_path / "runs"
    code, _, err = lmforge_main("train", "tiny", "--no-progress", "--run.out", runs, "--data.corpus", corpus, *extra)
    assert code == 2
    one_error_line(err)
    assert [p for p in runs.rglob("*") if p.is_file() or p.name.startswith(".")] == []
