"""`lmforge import` and `lmforge export`: a model directory in from anywhere, out to anything.

import: a Hugging Face directory (any supported family; single-file or sharded
safetensors; pickle only with allow_pickle) or a `.gguf` file -> an lmforge model directory.
export: a model directory -> hf (a directory transformers loads), gguf (llama.cpp) or onnx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lmforge.data.sentencepiece_convert import SPM_FILE
from lmforge.errors import LmforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Format = Literal["hf", "gguf", "onnx"]


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise LmforgeError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def import_model(src: str | Path, out: str | Path, dtype: str | None = None, allow_pickle: bool = False,
                 key: bytes | str | None = None, tokenizer: str | Path | None = None) -> Path:
    """Read a foreign model and write it as an lmforge model directory at `out`; `tokenizer`: a
    directory to take the tokenizer from, for weights that come without one."""
    from lmforge.model_dir import load_model_dir, save_model_dir

    src, out = Path(src), Path(out)
    if not src.exists():
        raise LmforgeError(f"{src} not found")
    if src.resolve() == out.resolve():
        raise LmforgeError("--out must differ from the source")
    if src.is_file() and src.suffix == ".gguf":
        if tokenizer is not None:
            raise LmforgeError("--tokenizer is for Hugging Face directories: a .gguf file carries its own tokenizer")
        from lmforge.interop.gguf_io import load_gguf

        model, text_tokenizer = load_gguf(src, parse_dtype(dtype))
        return save_model_dir(model, text_tokenizer, out, {"parents": [str(src)], "imported_from": "gguf"})
    if src.is_file():
        raise LmforgeError(f"{src} is a file: give a model directory (config.json + weights) or a .gguf file")
    if tokenizer is not None:
        _check_tokenizer_option(Path(tokenizer))
    model, text_tokenizer, _ = load_model_dir(src, dtype=parse_dtype(dtype), allow_pickle=allow_pickle, key=key,
                                              tokenizer=tokenizer)
    provenance = {"parents": [str(src)], "imported_from": model.config.family}
    if tokenizer is not None:
        provenance["tokenizer_from"] = str(tokenizer)
    return save_model_dir(model, text_tokenizer, out, provenance)


def _check_tokenizer_option(tokenizer: Path) -> None:
    if not tokenizer.is_dir():
        raise LmforgeError(f"--tokenizer {tokenizer}: not a directory (give the folder that holds tokenizer.json "
                           f"or {SPM_FILE})")
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / SPM_FILE).is_file()):
        raise LmforgeError(f"--tokenizer {tokenizer} has no tokenizer.json or {SPM_FILE}")

def export_model(model: str | Path, fmt: Format, out: str | Path, dtype: str | None = None,
                 gguf_type: str = "f16", quantize: str | None = None, key: bytes | str | None = None) -> Path:
    import lmforge

    out = Path(out)
    if fmt not in ("hf", "gguf", "onnx"):
        raise LmforgeError(f"--format {fmt!r} is not one of hf, gguf, onnx")
    loaded = lmforge.load(model, dtype=parse_dtype(dtype), key=key)
    if fmt == "hf":
        return loaded.save(out, exported_as="hf")
    if fmt == "gguf":
        from lmforge.interop.gguf_io import export_gguf

        return export_gguf(loaded, out, gguf_type)
    from lmforge.interop.onnx_export import export_onnx

    return export_onnx(loaded, out, quantize=quantize)


def export_for_runtimes(model: str | Path, out: str | Path, prompt: str = "ROMEO:") -> list[str]:
    """GGUF (q8_0) and ONNX exports of a model directory, and how to run each on `prompt`: lines to print."""
    import shlex

    import lmforge

    loaded = lmforge.load(model)
    out = Path(out)
    lines = []
    try:
        from lmforge.interop.gguf_io import export_gguf

        gguf_path = export_gguf(loaded, out / "model-q8_0.gguf", "q8_0")
        lines += [f"gguf (llama.cpp)    {gguf_path}",
                  f"   llama-cli -m {gguf_path} -p {shlex.quote(prompt)} -n 48   (or llama_cpp.Llama('{gguf_path}') in Python)"]
    except LmforgeError as e:
        lines.append(f"gguf: skipped ({e})")
    try:
        from lmforge.interop.onnx_export import export_onnx

        onnx_dir = export_onnx(loaded, out / "onnx")
        lines += [f"onnx (onnxruntime)  {onnx_dir / 'model.onnx'}",
                  f"   python -m lmforge.interop.onnx_run {onnx_dir} --prompt {shlex.quote(prompt)}"]
    except LmforgeError as e:
        lines.append(f"onnx: skipped ({e})")
    return lines
