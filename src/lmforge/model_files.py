"""The model directory's files, below any model: names, the shard index, hashes, JSON, tokenizer.

What every reader and writer of a model directory shares, whatever its weights hold (plain,
quantized by `lmforge.compress.storage`, sealed by `lmforge.interop.crypto`); `lmforge.model_dir`
loads and saves whole models on top of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.data.sentencepiece_convert import SPM_FILE
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".enc", *PICKLE_SUFFIXES)  # `.enc`: interop/crypto.py's sealed shards


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); the model directory is corrupt") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model directory (the shards, in index order, when sharded)."""
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map_index = weight_index(folder)
        return [folder / n for n in sorted(set(weight_map_index.values()))]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / "dcp" / ".metadata").is_file():  # train/checkpoint.py's sharded (multi-process) checkpoint
        raise LmforgeError(f"{folder} is a sharded training checkpoint, not a model directory: make one with "
                           f"`lmforge export-checkpoint {folder} --out DIR`")
    if pickle_files(folder):
        raise LmforgeError(f"{folder} holds only pickle weights ({pickle_files(folder)[0].name}), which can run "
                           "code when loaded. lmforge reads safetensors; if you trust the file, pass "
                           "--allow-pickle (allow_pickle=True) to read it with torch.load(weights_only=True)")
    raise LmforgeError(f"no {WEIGHTS} in {folder}; is this a model directory?")


def weight_index(folder: Path) -> dict[str, str]:
    weight_map_index = read_json(folder / WEIGHTS_INDEX).get("weight_map")
    if not isinstance(weight_map_index, dict) or not weight_map_index:
        raise LmforgeError(f"{folder / WEIGHTS_INDEX} has no weight_map")
    for name, file in weight_map_index.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise LmforgeError(f"{folder / WEIGHTS_INDEX}: tensor {name!r} points at {file!r}, "
                               "not a .safetensors file in this directory")
    return weight_map_index


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def refuse_links_out(folder: Path) -> None:
    """A model directory's files other than weights (configuration, tokenizer, chat template)
    must be its own: through a symlink out of it, a downloaded model would have lmforge read
    any file the user can, render it as a template, serve it (/tokenizer_info) and copy it
    into the models it imports. Weights may be links (they are only ever read as tensors)."""
    if not folder.is_dir():
        return
    root = folder.resolve()
    for entry in folder.iterdir():
        if not entry.is_symlink() or entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise LmforgeError(f"{entry} is a link to {target}, outside the model directory; lmforge reads a "
                               "model's configuration, tokenizer and chat template only from its own directory: "
                               "copy the files in (cp -rL DIR NEW_DIR copies a directory with its links followed)")


def load_tokenizer(folder: Path) -> TextTokenizer:
    """tokenizer.json (or a SentencePiece tokenizer.model) + tokenizer_config.json; newer transformers
    keep the chat template in chat_template.jinja."""
    refuse_links_out(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", SPM_FILE)):
        raise LmforgeError(f"{folder} has no tokenizer (tokenizer.json or {SPM_FILE}): copy the tokenizer files of "
                           "the model these weights come from into it, or import the weights with a tokenizer from "
                           f"another directory: lmforge import {folder} --out DIR --tokenizer TOKENIZER_DIR")
    tokenizer = TextTokenizer.load(folder)
    template = folder / "chat_template.jinja"
    if tokenizer.chat_template is None and template.is_file():
        tokenizer.config["chat_template"] = template.read_text()
    return tokenizer


def check_tokenizer_fits(tokenizer: TextTokenizer, vocab: int, where: Path) -> None:
    """Every id the tokenizer can produce needs a row of the embedding. A larger embedding is
    fine: vocabularies are often padded to a multiple of 64 or 128 for speed."""
    if tokenizer.vocab_size > vocab:
        raise LmforgeError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens but config.json's vocab_size "
                           f"is {vocab}: ids from {vocab} up would have no embedding; the tokenizer does not belong "
                           "to these weights")
