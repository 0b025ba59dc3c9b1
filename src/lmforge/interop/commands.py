"""The interop CLI verbs (`import`, `export`, `verify`, `encrypt`, `decrypt`), listed in `lmforge.cli`'s table."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.console_text import console

KeyFile = Annotated[Optional[Path], typer.Option(help="File holding the 32-byte key (raw, hex or base64).")]
KeyEnv = Annotated[Optional[str], typer.Option(help="Environment variable holding the key (hex or base64).")]


def _key(key_file: Path | None, key_env: str | None) -> bytes | None:
    if key_file is None and key_env is None:
        return None
    from lmforge.interop.crypto import read_key

    return read_key(key_file, key_env)


def with_model_key(command: Callable) -> Callable:
    """`command` with --key-file and --key-env added: the key of any encrypted model it loads.

    One definition for every command that loads a model directory (`lmforge.cli` applies it),
    so the options read the same everywhere and the command's own code needs no change: the
    key is held for the call (`crypto.command_key`) and loading picks it up."""
    signature = inspect.signature(command, eval_str=True)
    if "key_file" in signature.parameters:
        raise TypeError(f"{command.__name__} already takes key options")
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
               for name, annotation in (("key_file", KeyFile), ("key_env", KeyEnv))]

    @functools.wraps(command)
    def run(*args, key_file: Path | None = None, key_env: str | None = None, **kwargs):
        from lmforge.interop.crypto import command_key

        with command_key(_key(key_file, key_env), (key_file, key_env)):
            return command(*args, **kwargs)

    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *options])
    return run


def import_(
    src: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    out: Annotated[Path, typer.Option(help="The lmforge model directory to write.")],
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: as stored).")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Also read pickle weights (.bin/.pt/.ckpt), weights-only.")] = False,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Take the tokenizer (tokenizer.json or SentencePiece tokenizer.model, with tokenizer_config.json and "
             "chat template) from this directory, for weights that come without one.")] = None,
):
    """Import a Hugging Face directory (gpt2, llama, qwen2, mistral, phi3) or a GGUF file."""
    from lmforge.interop.convert import import_model

    path = import_model(src, out, dtype=dtype, allow_pickle=allow_pickle, tokenizer=tokenizer)
    console.print(f"imported {src} -> {path}")


def export(
    model: Annotated[Path, typer.Argument(help="A model directory.")],
    format: Annotated[str, typer.Option("--format", help="hf, gguf or onnx.")],
    out: Annotated[Path, typer.Option(help="Output directory (hf, onnx) or .gguf file.")],
    dtype: Annotated[Optional[str], typer.Option(help="hf/onnx: float32, bfloat16 or float16.")] = None,
    gguf_type: Annotated[str, typer.Option(help="gguf: f32, f16, q8_0, q4_0, q6_k or q4_k_m (q8_0 of an int8 model and q4_0 of a symmetric int4 one keep its codes).")] = "f16",
    quantize: Annotated[Optional[str], typer.Option(help="onnx: int8 for dynamic int8 quantization.")] = None,
):
    """Export a model directory for transformers (hf), llama.cpp (gguf) or onnxruntime (onnx)."""
    from lmforge.interop.convert import export_model

    path = export_model(model, format, out, dtype=dtype, gguf_type=gguf_type, quantize=quantize)
    console.print(f"exported {model} -> {path}")


def verify(model: Annotated[Path, typer.Argument(help="A model directory.")]):
    """Check every weight file against the sha256 recorded when it was written."""
    from lmforge.model_dir import verify_model_dir

    for name in verify_model_dir(model):
        console.print(f"ok  {model / name}")


def encrypt(
    model: Annotated[Path, typer.Argument(help="A model directory, encrypted in place.")],
    key_file: KeyFile = None,
    key_env: KeyEnv = None,
    new_key: Annotated[Optional[Path], typer.Option(help="Generate a fresh key and write it to this file.")] = None,
):
    """Encrypt a model directory's weights at rest with AES-256-GCM."""
    from lmforge.interop.crypto import encrypt_model_dir, new_key_file

    key = new_key_file(new_key) if new_key else _key(key_file, key_env)
    if key is None:
        from lmforge.errors import LmforgeError

        raise LmforgeError("give the key: --key-file FILE, --key-env VAR, or --new-key FILE to generate one")
    files = encrypt_model_dir(model, key)
    console.print(f"encrypted {len(files)} weight file(s) in {model}" + (f"; key in {new_key}" if new_key else ""))


def decrypt(
    model: Annotated[Path, typer.Argument(help="An encrypted model directory, decrypted in place.")],
    key_file: KeyFile = None,
    key_env: KeyEnv = None,
):
    """Decrypt a model directory encrypted by `lmforge encrypt`."""
    from lmforge.interop.crypto import decrypt_model_dir

    files = decrypt_model_dir(model, _key(key_file, key_env))
    console.print(f"decrypted {len(files)} weight file(s) in {model}")
