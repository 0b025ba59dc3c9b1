"""The command line: the README's commands run through the real console script, and every user
mistake gets one line on stderr and exit code 2, without a traceback or half-written output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import lmforge


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
    assert code == 2 and "--top-p must be in (0, 1]" in one_error_line(err)


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


# ----------------------------------------------------------------------------- every command on the first try

def test_version(cli):
    from importlib.metadata import version

    proc = cli("--version", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lmforge {version('lmforge')}"


def test_the_verb_table_is_the_cli():
    """Every verb comes from the one table in cli.py, and typer is imported only where commands
    are defined (cli.py and the modules its table names), never by the library they call."""
    import ast
    from pathlib import Path

    import typer.main

    from lmforge import cli

    group = typer.main.get_command(cli.app)
    assert list(group.commands) == [v.name for v in cli.COMMANDS] + ["data"]
    assert list(group.commands["data"].commands) == [v.name for v in cli.DATA_COMMANDS]
    for verb in cli.COMMANDS:
        passes_flags = (group.commands[verb.name].context_settings or {}).get("ignore_unknown_options", False)
        assert passes_flags == verb.overrides, verb.name
    command_modules = {v.command.__module__ for v in cli.COMMANDS + cli.DATA_COMMANDS} | {"lmforge.cli"}
    src = Path(cli.__file__).parent
    importing_typer = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "typer" or n.startswith("typer.") for n in names):
                module = ".".join(("lmforge", *path.relative_to(src).with_suffix("").parts))
                importing_typer.add(module.removesuffix(".__init__"))
    assert importing_typer == command_modules


def test_help_starts_without_torch():
    """`lmforge --help` (and any verb's --help) loads no torch: the CLI starts in well under a second."""
    code = ("import sys; from lmforge.cli import main; sys.argv = ['lmforge', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'optuna', 'fastapi') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_that_loads_a_model_takes_the_key_options():
    import typer.main

    from lmforge.cli import app

    commands = typer.main.get_command(app).commands
    own_key = {"encrypt", "decrypt"}  # the key they take is the one to seal or open with
    reads_files_only = {"verify"}  # checks the sealed files' hashes, never decrypts
    loading = {name for name, cmd in commands.items()
               if {p.name for p in cmd.params} & {"model", "models", "base", "teacher"}} - own_key - reads_files_only
    assert {"generate", "chat", "serve", "eval", "explain", "quantize", "prune", "compare", "export", "finetune",
            "merge", "distill"} <= loading
    for name in sorted(loading):
        options = {opt for p in commands[name].params for opt in p.opts}
        assert {"--key-file", "--key-env"} <= options, name


@pytest.fixture
def sealed_model(tiny_model_dir, tmp_path, monkeypatch):
    """(an encrypted copy of the tiny model, its key file)."""
    from lmforge.interop.crypto import encrypt_model_dir, new_key_file

    monkeypatch.delenv("LMFORGE_MODEL_KEY", raising=False)
    folder = shutil.copytree(tiny_model_dir, tmp_path / "sealed")
    encrypt_model_dir(folder, new_key_file(tmp_path / "key"))
    return folder, tmp_path / "key"


def test_an_encrypted_model_opens_with_the_options_its_error_names(lmforge_main, sealed_model, tiny_model_dir,
                                                                   tmp_path, monkeypatch):
    from lmforge.interop import crypto

    folder, key_file = sealed_model
    code, _, err = lmforge_main("generate", folder, "-p", "the", "--max-tokens", "4")
    assert code == 2 and "--key-file / --key-env" in one_error_line(err)
    (expected,) = lmforge.load(tiny_model_dir).generate("the", max_new_tokens=4)
    code, out, err = lmforge_main("generate", folder, "-p", "the", "--max-tokens", "4", "--key-file", key_file)
    assert code == 0, err
    assert out == "the" + expected + "\n"
    assert crypto._command_key is None  # held for the command only

    monkeypatch.setenv("SEALED_KEY", key_file.read_text().strip())
    (tmp_path / "some.txt").write_text("Chapter 3.\n1. The queen serves the crown.\n")
    code, out, err = lmforge_main("eval", folder, "--data", tmp_path / "some.txt", "--json", "--key-env", "SEALED_KEY")
    assert code == 0, err
    code, plain, _ = lmforge_main("eval", tiny_model_dir, "--data", tmp_path / "some.txt", "--json")
    assert json.loads(out) == json.loads(plain)
    # Quantized from the sealed model, then sealed itself: both open with the same options.
    code, out, err = lmforge_main("quantize", folder, "--method", "int8", "--out", tmp_path / "q8", "--key-file", key_file)
    assert code == 0, err
    (quantized,) = lmforge.load(tmp_path / "q8").generate("the", max_new_tokens=4)
    crypto.encrypt_model_dir(tmp_path / "q8", crypto.read_key(key_file))
    code, out, err = lmforge_main("generate", tmp_path / "q8", "-p", "the", "--max-tokens", "4", "--key-env", "SEALED_KEY")
    assert code == 0, err
    assert out == "the" + quantized + "\n"
    code, out, err = lmforge_main("compare", folder, tmp_path / "q8", "--chart", tmp_path / "c.png", "--json", "--max-batches", "1",
                                  "--new-tokens", "4", "--key-file", key_file)
    assert code == 0, err
    assert [row["method"] for row in json.loads(out)] == ["fp32", "int8"]
    code, _, err = lmforge_main("generate", folder, "-p", "the", "--key-env", "NO_SUCH_VARIABLE")
    assert code == 2 and "NO_SUCH_VARIABLE is not set" in one_error_line(err)


CHINESE = ("机器学习是人工智能的一个分支。深度学习模型（例如 Transformer）先在大量文本上预训练，"
           "然后在具体任务上微调。量化把模型的权重从三十二位浮点数压缩成八位或四位整数，"
           "从而减少内存占用，并加快推理速度。")


@pytest.fixture(scope="module")
def chinese_model(tmp_path_factory):
    """A tiny model that has learned one Chinese paragraph by heart (a few seconds of training):
    its greedy continuations are long runs of Chinese."""
    from lmforge.config import load_recipe
    from lmforge.train.trainer import train

    root = tmp_path_factory.mktemp("zh")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text((CHINESE + "\n") * 100, encoding="utf-8")
    recipe = load_recipe("tiny", {
        "model": {"n_layer": 1}, "data": {"corpus": str(root / "corpus"), "val_fraction": 0.1},
        "train": {"batch_size": 8, "max_steps": 60, "warmup": 5, "lr": 1e-2, "checkpoint_every": 60, "log_every": 60,
                  "dtype": "float32"},
        "eval": {"every": 1000, "batches": 1}, "run": {"name": "zh", "out": str(root / "runs")}})
    return train(recipe, progress=False, log=lambda s: None).model_dir


@pytest.mark.parametrize("mode", ["stream", "no-stream", "two prompts"])
def test_model_text_is_printed_unwrapped(cli, chinese_model, monkeypatch, mode):
    prompts = ["机器学习是", "量化把模型的"] if mode == "two prompts" else ["机器学习是"]
    expected = lmforge.load(chinese_model).generate(prompts, max_new_tokens=40)
    first_lines = [(p + text).split("\n")[0] for p, text in zip(prompts, expected)]
    assert all(sum("\u4e00" <= ch <= "\u9fff" for ch in line) > 30 for line in first_lines)  # 60+ columns each
    args = [a for p in prompts for a in ("--prompt", p)] + ["--max-tokens", "40"]
    args += ["--no-stream"] if mode == "no-stream" else []
    monkeypatch.setenv("COLUMNS", "40")
    proc = cli("generate", chinese_model, *args)
    assert proc.returncode == 0, proc.stderr
    if mode == "stream":
        assert proc.stdout == prompts[0] + expected[0] + "\n"
    else:
        for prompt, text in zip(prompts, expected):
            assert prompt + text + "\n" in proc.stdout  # no newline inserted at column 40
        assert proc.stdout.count("─" * 40) == len(prompts)  # the rule after each output is still 40 wide


def test_generate_on_an_encoder_is_one_line(lmforge_main, make_config, tokenizer, tmp_path):
    from lmforge.model import Transformer
    from lmforge.model_dir import save_model_dir

    torch.manual_seed(0)
    encoder = save_model_dir(Transformer(make_config(vocab_size=tokenizer.vocab_size, causal=False)), tokenizer,
                             tmp_path / "encoder")
    for args in (["generate", encoder, "-p", "The king"], ["generate", encoder, "-p", "a", "-p", "b", "--no-stream"]):
        code, out, err = lmforge_main(*args)
        assert code == 2 and out == ""
        assert "masked-LM encoder" in one_error_line(err)
    from lmforge.errors import LmforgeError
    from lmforge.serve.command import build_app
    from lmforge.serve.settings import ServeSettings

    with pytest.raises(LmforgeError, match="masked-LM encoder"):  # refused before it listens
        build_app(encoder, ServeSettings(model_name="encoder"))
    (tmp_path / "some.txt").write_text("Chapter 3.\n1. The queen serves the crown.\n")
    code, out, err = lmforge_main("eval", encoder, "--data", tmp_path / "some.txt")
    assert code == 0, err
    assert "pseudo-perplexity" in words(out) and "not comparable" in words(out)
