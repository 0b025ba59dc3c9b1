"""`lmforge data prepare`: tokenize a corpus and pack it into memory-mapped token shards.

Output directory:
    tokenizer.json, tokenizer_config.json   trained here, or copied from --tokenizer
    train-00000.bin …, val-00000.bin …       raw little-endian uint16 (uint32 if the vocabulary needs it)
    index.json                                dtype, vocabulary, per-split files/tokens/bytes, fingerprint

Each document is followed by the end-of-text token. The validation split is the tail of
every document (cut at a line boundary), so it samples the whole corpus rather than its
last files. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_directory
from lmforge.config import DataConfig, Recipe
from lmforge.data.corpora import iter_documents
from lmforge.data.tokenizer import TextTokenizer, batched, train_tokenizer
from lmforge.errors import LmforgeError

SHARD_TOKENS = 64 * 1024 * 1024
INDEX = "index.json"
FORMAT_VERSION = 1


def split_document(text: str, val_fraction: float, doc_index: int) -> tuple[str, str]:
    """(train part, validation part) of one document."""
    lines = text.splitlines(keepends=True)
    if len(lines) >= 4:
        cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - val_fraction))))
        return "".join(lines[:cut]), "".join(lines[cut:])
    # Too short to cut: whole documents go to validation at the requested rate.
    every = max(2, round(1 / val_fraction))
    return ("", text) if doc_index % every == every - 1 else (text, "")


class ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.files: list[str] = []
        self.tokens = 0
        self.bytes = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids: list[int], n_bytes: int) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self._file is None or self._in_shard >= SHARD_TOKENS:
                self._open_next()
            take = min(arr.size, SHARD_TOKENS - self._in_shard)
            self._file.write(arr[:take].tobytes())
            self._in_shard += take
            self.tokens += take
            arr = arr[take:]
        self.bytes += n_bytes

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._file = open(self.folder / name, "wb")
        self._in_shard = 0

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        return {"files": self.files, "tokens": self.tokens, "bytes": self.bytes}


def settings_key(cfg: DataConfig) -> dict:
    return {"corpus": cfg.corpus, "text_field": cfg.text_field, "vocab_size": cfg.tokenizer.vocab_size,
            "min_frequency": cfg.tokenizer.min_frequency, "tokenizer": cfg.tokenizer.path,
            "val_fraction": cfg.val_fraction, "format": FORMAT_VERSION}


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise LmforgeError(f"{folder} is not a prepared data directory (no {INDEX}); run `lmforge data prepare`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LmforgeError(f"{path} is corrupt; delete {folder} and run `lmforge data prepare` again") from None


def adopt_prepared(cfg: DataConfig) -> DataConfig:
    """A recipe whose data section names a prepared directory (`dir`) and no corpus trains on
    that directory as `lmforge data prepare` made it: corpus and tokenizer settings come from it."""
    if not cfg.dir or "corpus" in cfg.model_fields_set or not (Path(cfg.dir) / INDEX).is_file():
        return cfg
    made = read_index(cfg.dir).get("settings") or {}
    if made.get("format") != FORMAT_VERSION:
        raise LmforgeError(f"{cfg.dir} was prepared by another version of lmforge; prepare it again with "
                           "`lmforge data prepare ... --force`")
    tokenizer = cfg.tokenizer.model_copy(update={"vocab_size": made["vocab_size"], "path": made["tokenizer"],
                                                 "min_frequency": made["min_frequency"]})
    return cfg.model_copy(update={"corpus": made["corpus"], "text_field": made["text_field"],
                                  "val_fraction": made["val_fraction"], "tokenizer": tokenizer})


def data_dir_for(recipe: Recipe) -> Path:
    """Where a recipe's corpus is (or will be) prepared: data.dir, or a folder named after the
    corpus and the tokenizer under run.out."""
    if recipe.data.dir:
        return Path(recipe.data.dir)
    name = Path(recipe.data.corpus.rstrip("/")).name.replace("*", "_") or "corpus"
    tok = f"tok-{Path(recipe.data.tokenizer.path).name}" if recipe.data.tokenizer.path else f"v{recipe.data.tokenizer.vocab_size}"
    return Path(recipe.run.out) / "data" / f"{name}-{tok}"


def prepare(cfg: DataConfig, out: str | Path, force: bool = False, progress=None) -> Path:
    """Prepare `cfg.corpus` into `out`; reuse an existing directory made with the same settings."""
    out = Path(out)
    if (out / INDEX).is_file() and not force:
        if read_index(out).get("settings") == settings_key(cfg):
            return out
        raise LmforgeError(f"{out} holds data prepared with other settings; choose another directory or pass --force")

    def documents() -> Iterator[str]:
        return iter_documents(cfg.corpus, cfg.text_field)

    if cfg.tokenizer.path:
        tokenizer = TextTokenizer.load(cfg.tokenizer.path)
    else:
        if progress:
            progress("training tokenizer")
        tokenizer = train_tokenizer((d for d in documents() if d.strip()), cfg.tokenizer.vocab_size,
                                    cfg.tokenizer.min_frequency)
    if tokenizer.eos_id is None:
        raise LmforgeError("the tokenizer has no end-of-text token; documents could not be separated")
    dtype = np.dtype(np.uint16) if tokenizer.vocab_size <= 65536 else np.dtype(np.uint32)

    with atomic_directory(out) as staging:
        writers = {s: ShardWriter(staging, s, dtype) for s in ("train", "val")}
        digest = hashlib.sha256()
        n_docs = 0
        if progress:
            progress("tokenizing")
        for chunk in batched(documents(), 256):
            parts = [split_document(text, cfg.val_fraction, n_docs + i) for i, text in enumerate(chunk)]
            n_docs += len(chunk)
            for text in chunk:
                digest.update(text.encode("utf-8", "surrogatepass"))
            for split, texts in (("train", [p[0] for p in parts]), ("val", [p[1] for p in parts])):
                texts = [t for t in texts if t]
                for ids, text in zip(tokenizer.encode_batch(texts, parse_special=False), texts):
                    writers[split].write(ids + [tokenizer.eos_id], len(text.encode("utf-8", "surrogatepass")))
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["tokens"] == 0 or splits["val"]["tokens"] == 0:
            raise LmforgeError(f"corpus {cfg.corpus!r} is empty or too small to split into training and validation")
        tokenizer.save(staging)
        index = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                 "eos_id": tokenizer.eos_id, "documents": n_docs, "fingerprint": digest.hexdigest(),
                 "settings": settings_key(cfg), "splits": splits}
        (staging / INDEX).write_text(json.dumps(index, indent=2))
    return out
