"""Streaming weight loading: Hugging Face tensors -> a `Transformer`, one tensor at a time.

The model is built on the meta device, every shape is checked against the files'
headers, and only then is memory allocated, once, in the target dtype. Each of our
tensors is then filled straight from disk through its family `Rule` (a fused q/k/v
matrix is filled slice by slice), so the peak is the model plus at most one tensor.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol
from unittest import mock

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.families import Rule
from lmforge.interop.hf import check_names, normalize_names, weight_map
from lmforge.interop.safetensors_io import Header, TensorEntry, read_header, read_into, read_tensor
from lmforge.model import Transformer


class TensorSource(Protocol):
    description: str

    def names(self) -> list[str]: ...
    def entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]: ...
    def where(self, name: str) -> str: ...
    def read_into(self, name: str, dest: torch.Tensor) -> None: ...
    def read(self, name: str) -> torch.Tensor: ...


class SafetensorsFiles:
    """The tensors of one safetensors file or of a sharded checkpoint's shards."""

    def __init__(self, files: list[Path], index: dict[str, str] | None = None, opener=None):
        self.description = str(files[0].parent if len(files) > 1 else files[0])
        self.entries: dict[str, tuple[Path, TensorEntry]] = {}
        self.opener = opener or (lambda p: open(p, "rb"))
        for path in files:
            if opener is None and not path.is_file():
                raise LmforgeError(f"weight file {path} is missing")
            header: Header = read_header(path, self.opener)
            for name, entry in header.tensors.items():
                if name in self.entries:
                    raise LmforgeError(f"tensor {name!r} is in both {self.entries[name][0].name} and {path.name}")
                self.entries[name] = (path, entry)
        if index is not None:
            for name, file in index.items():
                if name not in self.entries or self.entries[name][0].name != file:
                    raise LmforgeError(f"the index says tensor {name!r} is in {file}, but it is not there")
            unlisted = sorted(set(self.entries) - set(index))
            if unlisted:
                raise LmforgeError(f"tensor {unlisted[0]!r} in {self.entries[unlisted[0]][0].name} is not in the index")
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self.entries[name][1]
        return e.dtype, e.shape

    def where(self, name: str) -> str:
        return str(self.entries[name][0])

    def _file(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(self.opener(path))
        return self._handles[path]

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        path, entry = self.entries[name]
        if dest.dtype == entry.dtype and dest.is_contiguous():
            read_into(self._file(path), entry, dest, path)
        else:
            dest.copy_(read_tensor(self._file(path), entry, path).view(dest.shape))

    def read(self, name: str) -> torch.Tensor:
        path, entry = self.entries[name]
        return read_tensor(self._file(path), entry, path)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


class MemoryTensors:
    """Tensors already in memory (a GGUF file dequantized, or an allowed pickle)."""

    def __init__(self, tensors: dict[str, torch.Tensor], description: str):
        self.tensors, self.description = tensors, description

    def names(self) -> list[str]:
        return list(self.tensors)

    def entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def where(self, name: str) -> str:
        return self.description

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        dest.copy_(self.tensors[name])

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


def _check_shapes(rule: Rule, expected: tuple[int, ...], source: TensorSource, names: dict[str, str]) -> None:
    entries = [(n, *source.entry(names[n])) for n in rule.theirs]
    for n, dtype, shape in entries:
        if not dtype.is_floating_point:
            raise LmforgeError(f"{source.where(names[n])}: tensor {n!r} is {dtype}; weights must be floating point")
    shapes = [shape for _, _, shape in entries]
    if rule.kind in ("same", "plus_one"):
        ok, want = shapes[0] == expected, [expected]
    elif rule.kind == "transpose":
        ok, want = shapes[0] == expected[::-1], [expected[::-1]]
    else:
        want = [(size, *expected[1:]) for size in rule.sizes]
        ok = shapes == want
    if not ok:
        bad = next(i for i, s in enumerate(shapes) if s != want[i])
        name = rule.theirs[bad]
        raise LmforgeError(f"{source.where(names[name])}: tensor {name!r} has shape {shapes[bad]} but config.json "
                           f"implies {want[bad]}: config and weights do not match")


def default_dtype(source: TensorSource) -> torch.dtype:
    """The dtype most of the weights are stored in (by element count)."""
    counts: dict[torch.dtype, int] = {}
    for name in source.names():
        dtype, shape = source.entry(name)
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            counts[dtype] = counts.get(dtype, 0) + int(torch.Size(shape).numel())
    return max(counts, key=counts.get) if counts else torch.float32


@contextmanager
def skeleton():
    """Build modules on the meta device without initializing them, as transformers does:
    the weights come from the files next, and a random init on meta would only cost
    seconds importing torch's reference decompositions."""
    with ExitStack() as stack:
        for cls in (nn.Linear, nn.Embedding, nn.LayerNorm, Transformer):
            stack.enter_context(mock.patch.object(cls, "reset_parameters", lambda self, *a, **k: None))
        stack.enter_context(mock.patch.object(Transformer, "init_rope", lambda self: None))
        stack.enter_context(torch.device("meta"))
        yield


def _materialize(model: Transformer, dtype: torch.dtype) -> None:
    """Give each meta parameter uninitialized CPU memory, once, in `dtype` (untouched pages cost
    nothing until filled). Done by hand: `to_empty` goes through torch's slow reference ops."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype), p.requires_grad)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def checked_skeleton(source: TensorSource, cfg: ModelConfig) -> tuple[Transformer, dict[str, str], list[Rule]]:
    """The model for `cfg` on the meta device, once `source`'s names and shapes are checked
    against it; with the source's name of each Hugging Face name and the rules that fill it."""
    names = normalize_names(source.names(), cfg)
    check_names(set(names), cfg, source.description)
    rules = weight_map(cfg)
    with skeleton():
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for rule in rules:
        _check_shapes(rule, expected[rule.ours], source, names)
    return model, names, rules


def load_weights(source: TensorSource, cfg: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
    """Build the model for `cfg` and fill it from `source` (Hugging Face names), validated first."""
    model, names, rules = checked_skeleton(source, cfg)
    _materialize(model, dtype or default_dtype(source))
    params = dict(model.named_parameters(remove_duplicate=False))
    try:
        with torch.no_grad():
            for rule in rules:
                dest = params[rule.ours]
                if rule.kind == "transpose":
                    dest.copy_(source.read(names[rule.theirs[0]]).t())
                elif rule.kind == "concat":
                    offset = 0
                    for name, size in zip(rule.theirs, rule.sizes):
                        source.read_into(names[name], dest[offset:offset + size])
                        offset += size
                elif rule.kind == "plus_one":  # in fp32, as the (1 + w) norm computes it
                    dest.copy_(source.read(names[rule.theirs[0]]).float() + 1)
                else:
                    source.read_into(names[rule.theirs[0]], dest)
    finally:
        source.close()
    model.init_rope()
    return model.eval()
