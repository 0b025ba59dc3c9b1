"""Readers: find input files, split them into shards of work, stream documents from a shard.

Inputs are files, directories (searched recursively) and globs. Supported: JSONL (plain,
.gz, .zst), Parquet, and plain text (one file = one document). Memory stays bounded: lines
are read with a byte limit, so a 100 MB line costs a 4 MB buffer and is counted as
`oversized`; Parquet is read in record batches. Whatever cannot be read is counted in
`issues` under a named reason, never raised: a bad document must not stop the run.

A JSONL or Parquet document keeps its whole input record (`Document.record`: id, url,
metadata...), so the output can carry every field on. A lone UTF-16 surrogate (the JSON
escape `\\ud800`, or the bytes ED A0 80 that `json.loads` lets through) cannot be written
as UTF-8: it is replaced by U+FFFD wherever it is in the record and counted as
`lone_surrogates`, and the document goes on.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.clean.document import Document
from lmforge.data.clean.recipe import ReaderConfig
from lmforge.errors import LmforgeError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
_SNIFF_BYTES = 8192
# a surrogate as a JSON escape (\ud800-\udfff) or as raw CESU-8 bytes (ED A0-BF xx)
_SURROGATE_HINT_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input file: a byte range, a row-group range, or the whole file."""

    path: str
    kind: str  # "jsonl" | "parquet" | "text"
    compression: str | None = None
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]


def file_kind(path: str) -> tuple[str, str | None] | None:
    """(kind, compression) from the file name, or None when the name says nothing we read."""
    name = path.lower()
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    return None


def discover(inputs: list[str]) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """Expand inputs into sorted (path, kind, compression) files, and the files skipped."""
    found: dict[str, tuple[str, str | None]] = {}
    skipped: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            candidates = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
            explicit = False
        elif os.path.isfile(spec):
            candidates, explicit = [spec], True
        else:
            candidates = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            explicit = False
            if not candidates:
                raise LmforgeError(f"input '{spec}' matches no file; pass existing files, directories or globs")
        for path in candidates:
            kind = file_kind(path)
            if kind is None and explicit:
                kind = ("text", None)  # a file named on the command line is read as text
            if kind is None:
                skipped.append(path)
            else:
                found[path] = kind
    if not found:
        raise LmforgeError(f"no readable input among {inputs}: expected .jsonl[.gz|.zst], .parquet or .txt files")
    return [(path, *found[path]) for path in sorted(found)], skipped


def plan_shards(files: list[tuple[str, str, str | None]], shard_bytes: int) -> list[Shard]:
    """Split the work: plain JSONL by byte ranges, Parquet by row groups, text files grouped."""
    shards: list[tuple[Piece, ...]] = []
    text_group: list[Piece] = []
    text_bytes = 0
    for path, kind, compression in files:
        size = os.path.getsize(path)
        if kind == "jsonl" and compression is None and size > shard_bytes:
            shards.extend((Piece(path, kind, None, start, min(start + shard_bytes, size)),) for start in range(0, size, shard_bytes))
        elif kind == "parquet":
            shards.extend((piece,) for piece in _parquet_pieces(path, shard_bytes))
        elif kind == "text":
            text_group.append(Piece(path, kind, compression))
            text_bytes += size
            if text_bytes >= shard_bytes:
                shards.append(tuple(text_group))
                text_group, text_bytes = [], 0
        else:
            shards.append((Piece(path, kind, compression),))
    if text_group:
        shards.append(tuple(text_group))
    return [Shard(i, pieces) for i, pieces in enumerate(shards)]


def _parquet_pieces(path: str, shard_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception:  # a corrupt file is counted when the shard is read
        return [Piece(path, "parquet", None, 0, None)]
    pieces, start, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= shard_bytes:
            pieces.append(Piece(path, "parquet", None, start, group + 1))
            start, size = group + 1, 0
    if start < metadata.num_row_groups or not pieces:
        pieces.append(Piece(path, "parquet", None, start, metadata.num_row_groups))
    return pieces


def _open_binary(piece: Piece) -> io.BufferedIOBase:
    if piece.compression == "gzip":
        return gzip.open(piece.path, "rb")
    if piece.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(piece.path, "rb"), closefd=True))
    return open(piece.path, "rb")


def _decode(raw: bytes, issues: Counter) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        issues["undecodable_bytes"] += 1  # kept, with U+FFFD where the bytes were
        return raw.decode("utf-8", errors="replace")


def _without_surrogates(value):
    """`value` (a str, or a record's lists and dicts) with every surrogate code point made U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE_RE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


def _has_surrogates(value) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE_RE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_surrogates, value))
    return False


def _lines(stream: io.BufferedIOBase, limit: int, start: int, end: int | None, issues: Counter) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for lines starting in [start, end); lines over `limit` bytes are skipped."""
    position = start
    if start > 0:
        stream.seek(start - 1)
        position = start - 1
        while True:  # the line that straddles `start` belongs to the previous shard
            chunk = stream.readline(limit)
            position += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
    while end is None or position < end:
        offset = position
        line = stream.readline(limit)
        if not line:
            return
        position += len(line)
        if len(line) >= limit and not line.endswith(b"\n"):
            issues["oversized"] += 1
            while True:
                chunk = stream.readline(limit)
                position += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            continue
        yield offset, line


def _input_id(record: dict, ours: str) -> str:
    """The record's own `id` when it has one (users trace documents by it), else ours."""
    theirs = record.get("id")
    return ours if theirs is None else str(theirs)


def _read_jsonl(piece: Piece, config: ReaderConfig, issues: Counter) -> Iterator[Document]:
    limit = config.max_doc_chars * 4 + 4096
    with _open_binary(piece) as stream:
        for offset, line in _lines(stream, limit, piece.start, piece.end, issues):
            if not line.strip():
                continue
            if offset == 0 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                line = line[3:]
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                try:
                    record = json.loads(_decode(line, issues))
                except ValueError:
                    issues["malformed_json"] += 1
                    continue
            except ValueError:
                issues["malformed_json"] += 1
                continue
            # json.loads joins an escaped surrogate pair into one character; what is left alone cannot be UTF-8
            if _SURROGATE_HINT_RE.search(line) and _has_surrogates(record):
                issues["lone_surrogates"] += 1
                record = _without_surrogates(record)
            if not isinstance(record, dict) or config.text_field not in record:
                issues["missing_field"] += 1
                continue
            text = record[config.text_field]
            if not isinstance(text, str):
                issues["not_a_string"] += 1
                continue
            if len(text) > config.max_doc_chars:
                issues["oversized"] += 1
                continue
            yield Document(text=text, id=_input_id(record, f"{piece.path}@{offset}"), record=record)


def _read_text(piece: Piece, config: ReaderConfig, issues: Counter) -> Iterator[Document]:
    limit = config.max_doc_chars * 4
    with _open_binary(piece) as stream:
        raw = stream.read(limit + 1)
    if b"\x00" in raw[:_SNIFF_BYTES]:
        issues["binary_file"] += 1
        return
    if len(raw) > limit:
        issues["oversized"] += 1
        return
    text = _decode(raw, issues)
    if len(text) > config.max_doc_chars:
        issues["oversized"] += 1
        return
    yield Document(text=text, id=piece.path, record={config.text_field: text})


def _read_parquet(piece: Piece, config: ReaderConfig, issues: Counter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(piece.path)
    groups = list(range(piece.start, piece.end if piece.end is not None else parquet.metadata.num_row_groups))
    if config.text_field not in parquet.schema_arrow.names:
        issues["missing_field"] += sum(parquet.metadata.row_group(g).num_rows for g in groups)
        return
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))
    for batch in parquet.iter_batches(batch_size=256, row_groups=groups):  # every column: the record goes on
        for record in batch.to_pylist():
            row += 1
            text = record[config.text_field]
            if not isinstance(text, str):
                issues["missing_field" if text is None else "not_a_string"] += 1
            elif len(text) > config.max_doc_chars:
                issues["oversized"] += 1
            else:
                yield Document(text=text, id=_input_id(record, f"{piece.path}#{row - 1}"), record=record)


_READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet}


def _corrupt_file_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    import zstandard

    # truncated gzip (EOFError, BadGzipFile), corrupt zstd (ZstdError), corrupt Parquet (ArrowException)
    return (OSError, EOFError, ValueError, zstandard.ZstdError, pyarrow.ArrowException)


def read_shard(shard: Shard, config: ReaderConfig, issues: Counter) -> Iterator[Document]:
    """Every document of the shard; unreadable input is counted in `issues`, never raised."""
    errors = _corrupt_file_errors()
    for piece in shard.pieces:
        try:
            yield from _READERS[piece.kind](piece, config, issues)
        except errors:
            issues["corrupt_file"] += 1
