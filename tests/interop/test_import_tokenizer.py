"""`lmforge import --tokenizer DIR`: weights that come without a tokenizer take one from elsewhere;
without either, the error names both fixes; a tokenizer larger than the embedding is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, VOCAB, hf_logits, probe_ids

import lmforge
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.convert import import_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROMPT = "用 PyTorch 训练 Transformer 模型 🚀 def f(x): return x**2"


def lmforge_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def bare_weights(hf_dirs, tmp_path):
    """A copy of the tiny llama directory with its tokenizer files removed (as some weight-only uploads are)."""
    folder = shutil.copytree(hf_dirs["llama"][1], tmp_path / "weights-only")
    for name in TOKENIZER_FILES:
        (folder / name).unlink()
    return folder


@pytest.fixture
def tokenizer_dir(hf_dirs, tmp_path):
    """The tokenizer the weights were published with, elsewhere, its chat template in chat_template.jinja."""
    folder = tmp_path / "tokenizer-from-elsewhere"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(hf_dirs["llama"][1] / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_weights_without_tokenizer_name_both_fixes(bare_weights, tmp_path):
    with pytest.raises(LmforgeError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\): copy the "
                                           r"tokenizer files .* or import the weights .* --tokenizer TOKENIZER_DIR"):
        import_model(bare_weights, tmp_path / "out")
    bad = lmforge_cli("import", bare_weights, "--out", tmp_path / "out")
    assert bad.returncode == 2 and "--tokenizer TOKENIZER_DIR" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()


def test_import_takes_the_tokenizer_from_elsewhere(hf_dirs, bare_weights, tokenizer_dir, tokenizer, tmp_path):
    done = lmforge_cli("import", bare_weights, "--out", tmp_path / "m", "--tokenizer", tokenizer_dir)
    assert done.returncode == 0, done.stderr
    ours = lmforge.load(tmp_path / "m")
    assert ours.tokenizer.encode(PROMPT) == tokenizer.encode(PROMPT)
    assert ours.tokenizer.chat_template == CHAT_TEMPLATE  # from chat_template.jinja
    assert ours.tokenizer.eos_id == tokenizer.eos_id
    meta = json.loads((tmp_path / "m" / "lmforge.json").read_text())
    assert meta["tokenizer_from"] == str(tokenizer_dir) and meta["parents"] == [str(bare_weights)]
    ids = probe_ids()
    with torch.no_grad():
        assert (ours.model(ids).float() - hf_logits(hf_dirs["llama"][0], ids)).abs().max() < 1e-4


def test_tokenizer_flag_overrides_the_directory_s_own(hf_dirs, tmp_path):
    other = train_tokenizer(["整理 web 页面 and JSONL records " * 4, "lorem ipsum dolor sit amet"] * 10, VOCAB - 20)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other.save(other_dir)
    out = import_model(hf_dirs["llama"][1], tmp_path / "m", tokenizer=other_dir)
    assert lmforge.load(out).tokenizer.encode(PROMPT) == other.encode(PROMPT)


def test_tokenizer_larger_than_the_embedding_is_refused(bare_weights, tmp_path):
    big = train_tokenizer(["量子计算 quantum error correction"] * 10 + [chr(0x4E00 + i) * 3 for i in range(400)],
                          VOCAB + 64, min_frequency=1)
    assert big.vocab_size > VOCAB
    big_dir = tmp_path / "big"
    big_dir.mkdir()
    big.save(big_dir)
    with pytest.raises(LmforgeError, match=rf"has {big.vocab_size} tokens but config.json's vocab_size is {VOCAB}"):
        import_model(bare_weights, tmp_path / "out", tokenizer=big_dir)
    assert not (tmp_path / "out").exists()


def test_embedding_larger_than_the_tokenizer_is_accepted(bare_weights, tmp_path):
    small = train_tokenizer(["a padded vocabulary is common"] * 10, VOCAB - 32)
    assert small.vocab_size < VOCAB
    small_dir = tmp_path / "small"
    small_dir.mkdir()
    small.save(small_dir)
    out = import_model(bare_weights, tmp_path / "m", tokenizer=small_dir)
    loaded = lmforge.load(out)
    assert loaded.config.vocab == VOCAB and loaded.tokenizer.vocab_size == small.vocab_size


@pytest.mark.parametrize("case", ["missing", "file", "empty", "gguf"])
def test_bad_tokenizer_option_is_one_clear_error(case, bare_weights, tmp_path):
    where = tmp_path / "tok"
    src = bare_weights
    if case == "file":
        where.write_text("{}")
    elif case == "empty":
        where.mkdir()
    elif case == "gguf":
        src = tmp_path / "model.gguf"
        src.write_bytes(b"GGUF")
        where = bare_weights
    expected = {"missing": "not a directory", "file": "not a directory", "empty": "has no tokenizer.json or "
                "tokenizer.model", "gguf": "a .gguf file carries its own tokenizer"}[case]
    bad = lmforge_cli("import", src, "--out", tmp_path / "out", "--tokenizer", where)
    assert bad.returncode == 2 and expected in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "out").exists()
