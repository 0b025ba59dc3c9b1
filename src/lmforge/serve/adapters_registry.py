"""The LoRA adapters a server decodes with beside its base model: `--adapter NAME=DIR` at
start, POST/DELETE /admin/adapters at run time. A request whose `model` is an adapter's name
decodes with that adapter; the base model's name, with none. Rows of every adapter share the
engine's batches (`lmforge.infer.lora_batch`).

At run time an adapter may only come from a directory under `--adapter-root` (resolved, so
neither `..` nor a symlink leads out of it), and only as safetensors: a request must not
make the server read files the operator did not put there for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.adapters import adapter_matrices
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.lora_batch import LoraAdapter, lora_update
from lmforge.loaded import LoadedModel
from lmforge.model.lora import lora_scaling

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class AdapterError(LmforgeError):
    """An adapter that cannot be loaded or unloaded, with the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_adapter_flag(value: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR)."""
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise LmforgeError(f"--adapter {value!r}: give NAME=DIR (the name requests send as `model`, and the "
                           "adapter directory `lmforge finetune` wrote)")
    return name, Path(path)


class AdapterRegistry:
    def __init__(self, engine: Engine, base_name: str, loaded: LoadedModel | None = None, root: Path | None = None):
        """`loaded`: the base model as loaded (its weights' hashes check adapters' records);
        `root`: where POST /admin/adapters may load from (None: nowhere)."""
        self.engine, self.base_name = engine, base_name
        self.loaded = loaded or LoadedModel(engine.model, engine.tokenizer)
        self.root = None if root is None else Path(root).resolve()
        self.paths: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.engine.adapters)

    def resolve(self, model: str | None) -> str | None:
        """The adapter a request's `model` names, or None for the base model."""
        return model if model is not None and model != self.base_name and model in self.engine.adapters else None

    def read(self, name: str, path: str | Path) -> LoraAdapter:
        """The adapter at `path`, checked against the base model, ready to serve as `name`."""
        if not NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_', "
                               "':' or '-', starting with a letter or digit")
        if name == self.base_name or name in self.engine.adapters:
            raise AdapterError(f"the name {name!r} is taken: unload that adapter first or choose another", 409)
        if not Path(path).is_dir():
            raise AdapterError(f"adapter path {path} is not a directory")
        try:
            config, slices, pairs = adapter_matrices(self.loaded, path)
        except LmforgeError:
            raise
        except Exception as e:  # a damaged file: the reader's own error, on one line
            raise AdapterError(f"adapter {path} cannot be read: {' '.join(str(e).split())[:300]}") from None
        r = config["r"]
        scaling = lora_scaling(r, float(config.get("lora_alpha", 8)), bool(config.get("use_rslora")))
        by_linear: dict[str, list] = {}
        for s in slices:
            by_linear.setdefault(s.linear, []).append(s)
        layers = {linear: lora_update([(s.start, s.size) for s in own], [pairs[s.hf_module]["lora_A"] for s in own],
                                      [pairs[s.hf_module]["lora_B"] for s in own], scaling)
                  for linear, own in by_linear.items()}
        return LoraAdapter(name, layers)

    def add(self, adapter: LoraAdapter, path: str | Path) -> None:
        try:
            self.engine.add_adapter(adapter)
        except LmforgeError as e:  # another load of the same name won the race
            raise AdapterError(str(e), 409) from None
        self.paths[adapter.name] = str(path)

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        adapter = self.read(name, path)
        self.add(adapter, path)
        return adapter

    def checked_path(self, path: str) -> Path:
        """A path a request asks to load from: a directory under the adapter root, resolved."""
        if self.root is None:
            raise AdapterError("loading adapters at run time is off: start the server with --adapter-root DIR", 403)
        if "\x00" in path:
            raise AdapterError("the adapter path holds a NUL byte")
        given = Path(path)
        resolved = (given if given.is_absolute() else self.root / given).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise AdapterError(f"adapter path {path[:200]!r} is outside the adapter root (--adapter-root)", 403)
        if not resolved.is_dir():
            raise AdapterError(f"adapter path {path[:200]!r} is not a directory under the adapter root")
        return resolved

    def unload(self, name: str) -> LoraAdapter:
        """Stop serving `name`; its running requests finish with it (see Engine.remove_adapter)."""
        try:
            adapter = self.engine.remove_adapter(name)
        except LmforgeError as e:
            raise AdapterError(str(e), 404) from None
        self.paths.pop(name, None)
        return adapter
