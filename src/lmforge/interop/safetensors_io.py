"""Validated safetensors reading: every header is checked before a byte is allocated.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and [start, end) byte range in the data section, then the data.
A hostile or damaged file can lie in all of these; `read_header` checks the header's
size against the file, the JSON, each dtype and shape, that every byte range lies inside
the file, matches its dtype and shape exactly, and overlaps no other. Only then does
`read_into` copy bytes, straight into the destination tensor (no memory map, no
intermediate copy), so loading needs about the model's own size in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 8
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def read_header(path: Path, opener=None) -> Header:
    """Parse and validate a safetensors header; raises LmforgeError naming the file and the problem.

    `opener(path)` gives a binary file object (an in-memory one for decrypted weights).
    """
    def bad(problem: str) -> LmforgeError:
        return LmforgeError(f"{path}: {problem}; the file is corrupt, truncated or not safetensors")

    try:
        with (opener(path) if opener else open(path, "rb")) as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"only {size} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise bad(f"header claims {n:,} bytes (the limit is {MAX_HEADER_BYTES:,})")
            if 8 + n > size:
                raise bad(f"header claims {n:,} bytes but the file has {size - 8:,} after the length")
            raw = f.read(n)
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {}
    for name, spec in header.items():
        tensors[name] = _entry(name, spec, data_start, data_len, bad)
    last_end = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start - data_start < last_end:
            raise bad(f"tensor {entry.name!r} overlaps the tensor before it")
        last_end = entry.end - data_start
    if last_end != data_len:
        raise bad(f"the data section is {data_len:,} bytes but the tensors cover {last_end:,}")
    return Header(path, tensors, metadata)


def _entry(name: str, spec, data_start: int, data_len: int, bad) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise bad(f"tensor {name!r} has data_offsets {offsets} outside the {data_len:,}-byte data section")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != expected:
        raise bad(f"tensor {name!r} is {dtype}{shape}, {expected:,} bytes, but its data_offsets span {end - start:,}")
    return TensorEntry(name, DTYPES[dtype], tuple(shape), data_start + start, data_start + end)


def read_into(f, entry: TensorEntry, dest: torch.Tensor, path: Path) -> None:
    """Copy one tensor's bytes from an open file into `dest` (contiguous, same dtype and size)."""
    if not dest.is_contiguous() or dest.dtype != entry.dtype or dest.numel() * dest.element_size() != entry.nbytes:
        raise ValueError(f"destination for {entry.name} does not match it")  # a bug, not a user mistake
    if entry.nbytes == 0:
        return
    buffer = memoryview(dest.view(-1).view(torch.uint8).numpy())
    f.seek(entry.start)
    done = 0
    while done < entry.nbytes:
        got = f.readinto(buffer[done:])
        if not got:
            raise LmforgeError(f"{path} ended inside tensor {entry.name!r}: the file is truncated")
        done += got


def read_tensor(f, entry: TensorEntry, path: Path) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    read_into(f, entry, out, path)
    return out


class MemoryFile:
    """A read-only binary file over a buffer, without copying it (io.BytesIO would)."""

    def __init__(self, buffer: bytearray):
        self.view, self.pos = memoryview(buffer), 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else len(self.view) + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos:end])
        self.pos = max(self.pos, end)
        return out

    def readinto(self, b) -> int:
        chunk = self.view[self.pos:self.pos + len(b)]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)
