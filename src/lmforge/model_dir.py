"""Reading and writing the model directory, the contract every stage shares.

    config.json              Hugging Face keys
    model.safetensors        Hugging Face tensor names (or sharded, with model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, generation_config.json
    lmforge.json             provenance: parents, recipe, metrics, data fingerprint, sha256 per weight file

A directory is written under a temporary name and renamed into place when complete, so
a crash never leaves a half-written model where a complete one is expected. Only
safetensors is read: pickle checkpoints can run code when loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from lmforge.model import Transformer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.ckpt", "pytorch_model.bin.index.json")


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


@contextmanager
def atomic_directory(out: str | Path):
    """Yield a staging directory that replaces `out` only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_model_files(d: Path, model: Transformer, tokenizer: TextTokenizer,
                      provenance: dict[str, Any] | None = None) -> None:
    """Write the model-directory files into an existing folder `d` (not atomic on its own)."""
    cfg = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state, cfg)
    (d / "config.json").write_text(json.dumps(to_hf_config(cfg, tokenizer.special_ids()), indent=2))
    save_file(hf_state, str(d / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save(d, model_max_length=cfg.context)
    generation = {k: v for k, v in tokenizer.special_ids().items() if v is not None}
    (d / "generation_config.json").write_text(json.dumps({**generation, "max_length": cfg.context}, indent=2))
    meta = {
        "lmforge_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model_dump(mode="json"),
        "parameters": model.num_params(),
        **(provenance or {}),
        "weights": {WEIGHTS: sha256_file(d / WEIGHTS)},
    }
    (d / "lmforge.json").write_text(json.dumps(meta, indent=2, default=str))


def save_model_dir(model: Transformer, tokenizer: TextTokenizer, out: str | Path,
                   provenance: dict[str, Any] | None = None) -> Path:
    with atomic_directory(out) as d:
        write_model_files(d, model, tokenizer, provenance)
    return Path(out)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_INDEX).is_file():
        index = read_json(folder / WEIGHTS_INDEX)
        names = sorted(set((index.get("weight_map") or {}).values()))
        if not names:
            raise LmforgeError(f"{folder / WEIGHTS_INDEX} has no weight_map")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickled:
        raise LmforgeError(f"{folder} holds only pickle weights ({pickled[0]}), which can run code when loaded; "
                           "lmforge reads safetensors: convert them first")
    raise LmforgeError(f"no {WEIGHTS} in {folder}; is this a model directory?")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise LmforgeError(f"weight file {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise LmforgeError(f"{path} is corrupt or truncated ({str(e)[:160]}); re-create or re-download it") from None
    return tensors


def load_model_dir(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(f"model directory {path} not found")
    cfg: ModelConfig = from_hf_config(read_json(folder / "config.json"))
    hf_state = read_safetensors(weight_files(folder))
    state = from_hf_state_dict(hf_state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise LmforgeError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                               f"{tuple(expected[name].shape)}: config and weights do not match")
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.init_rope()
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = TextTokenizer.load(folder)
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return model, tokenizer, meta
