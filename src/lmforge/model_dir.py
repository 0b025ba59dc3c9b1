"""Reading and writing the model directory, the contract every stage shares.

    config.json              Hugging Face keys
    model.safetensors        Hugging Face tensor names (or sharded, with model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, generation_config.json
    lmforge.json             provenance: parents, recipe, metrics, data fingerprint, sha256 per weight file

A directory is written under a temporary name and renamed into place when complete, so
a crash never leaves a half-written model where a complete one is expected. Only
safetensors is read (headers validated first, tensors streamed one by one, see
`lmforge.interop.weights`): pickle checkpoints can run code when loaded, and are read
only when the caller allows it, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.atomic import atomic_directory  # noqa: F401  (re-exported: callers import it from here)
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.crypto import ENCRYPTION_FILE
from lmforge.interop.hf import from_hf_config, split_rule, to_hf_config, weight_map
from lmforge.interop.weights import MemoryTensors, SafetensorsFiles, TensorSource, load_weights
from lmforge.model import Transformer
from lmforge.model_files import (
    WEIGHTS, WEIGHTS_INDEX, check_tokenizer_fits, load_tokenizer, pickle_files, read_json, refuse_links_out,
    sha256_file, weight_files, weight_index,
)

MAX_SHARD_BYTES = 4 << 30


def write_weights(d: Path, model: Transformer, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """Hugging Face-named safetensors, sharded with an index past `max_shard_bytes`.

    Renamed and split tensors are made one shard at a time. Returns {file: sha256}.
    """
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    shards: list[list] = [[]]
    size = 0
    for rule in weight_map(cfg):
        nbytes = state[rule.ours].numel() * state[rule.ours].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rule)
        size += nbytes
    names = [WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map_index: dict[str, str] = {}
    total = 0
    for name, rules in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for rule in rules:
            tensors.update(split_rule(rule, state[rule.ours].to("cpu").contiguous()))
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map_index.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map_index}
        (d / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
    return {name: sha256_file(d / name) for name in names}


def write_model_files(d: Path, model: Transformer, tokenizer: TextTokenizer,
                      provenance: dict[str, Any] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the model-directory files into an existing folder `d` (not atomic on its own)."""
    cfg = model.config
    dtype = model.tok_emb.weight.dtype
    hf_config = to_hf_config(cfg, tokenizer.special_ids(), dtype)
    quantization = getattr(model, "quantization", None)  # set by lmforge.compress on quantized models
    if quantization:
        from lmforge.compress.storage import quantized_hf_config, quantized_params, write_quantized_weights

        hf_config = quantized_hf_config(hf_config, model)
        hashes, parameters = write_quantized_weights(d, model), quantized_params(model)
    elif getattr(model, "compact_storage", False):  # set by `lmforge prune`: zeros not stored (compress/sparse.py)
        from lmforge.compress.sparse import write_sparse_weights

        (hf_config, hashes), parameters = write_sparse_weights(d, model, hf_config), model.num_params()
    else:
        hashes, parameters = write_weights(d, model, max_shard_bytes), model.num_params()
    write_config_files(d, hf_config, tokenizer, cfg.context)
    meta = {
        "lmforge_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model_dump(mode="json"),
        "parameters": parameters,
        **({"quantization": quantization} if quantization else {}),
        **(provenance or {}),
        "weights": hashes,
    }
    (d / "lmforge.json").write_text(json.dumps(meta, indent=2, default=str))


def write_config_files(d: Path, hf_config: dict[str, Any], tokenizer: TextTokenizer, context: int) -> None:
    """config.json, the tokenizer files and generation_config.json: everything but the weights
    and lmforge.json (sharded training checkpoints keep these beside their own weight shards)."""
    (d / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save(d, model_max_length=context)
    generation = {k: v for k, v in tokenizer.special_ids().items() if v is not None}
    (d / "generation_config.json").write_text(json.dumps({**generation, "max_length": context}, indent=2))


def save_model_dir(model: Transformer, tokenizer: TextTokenizer, out: str | Path,
                   provenance: dict[str, Any] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    with atomic_directory(out) as d:
        write_model_files(d, model, tokenizer, provenance, max_shard_bytes)
    return Path(out)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def read_pickle_weights(files: list[Path]) -> MemoryTensors:
    """Only behind --allow-pickle, and even then no arbitrary objects: weights_only=True."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle raises many types; the message is what matters
            raise LmforgeError(f"{path} could not be read as weights-only pickle: {str(e).splitlines()[0][:200]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LmforgeError(f"{path} does not hold a plain {{name: tensor}} state dict")
        tensors.update(state)
    return MemoryTensors(tensors, str(files[0].parent))


def weight_source(folder: Path, allow_pickle: bool = False, key: bytes | None = None) -> TensorSource:
    if (folder / ENCRYPTION_FILE).is_file():
        from lmforge.interop.crypto import decrypted_source

        return decrypted_source(folder, key)
    if allow_pickle and not (folder / WEIGHTS).is_file() and not (folder / WEIGHTS_INDEX).is_file() \
            and pickle_files(folder):
        return read_pickle_weights(pickle_files(folder))
    files = weight_files(folder)
    return SafetensorsFiles(files, weight_index(folder) if (folder / WEIGHTS_INDEX).is_file() else None)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   allow_pickle: bool = False, key: bytes | str | None = None,
                   tokenizer: str | Path | None = None) -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    """Load any model directory: ours, a Hugging Face one of a supported family, or an encrypted one (+ key).
    `tokenizer`: a directory to take the tokenizer from instead (for weights that come without one)."""
    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(f"model directory {path} not found")
    refuse_links_out(folder)
    hf_config = read_json(folder / "config.json")
    if isinstance(key, str):
        from lmforge.interop.crypto import parse_key

        key = parse_key(key)
    if "quantization_config" in hf_config:  # packed integers and scales: lmforge.compress reads those
        from lmforge.compress.storage import load_quantized

        return load_quantized(folder, hf_config, device, dtype, key)
    if "sparsity_config" in hf_config:  # pruned weights stored compactly: lmforge.compress.sparse expands them
        from lmforge.compress.sparse import load_sparse

        return load_sparse(folder, hf_config, device, dtype, key)
    cfg: ModelConfig = from_hf_config(hf_config)
    source = weight_source(folder, allow_pickle, key)
    tokenizer_dir = folder if tokenizer is None else Path(tokenizer)
    text_tokenizer = load_tokenizer(tokenizer_dir)  # before reading the weights: a missing one fails in seconds
    check_tokenizer_fits(text_tokenizer, cfg.vocab, tokenizer_dir)
    model = load_weights(source, cfg, dtype).to(device)
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return model, text_tokenizer, meta


def verify_model_dir(path: str | Path) -> dict[str, str]:
    """Check every weight file against the sha256 lmforge.json (or encryption.json) recorded."""
    folder = Path(path)
    record = folder / ENCRYPTION_FILE if (folder / ENCRYPTION_FILE).is_file() else folder / "lmforge.json"
    hashes = read_json(record).get("weights") if record.is_file() else None
    if not isinstance(hashes, dict) or not hashes:
        raise LmforgeError(f"{record} records no sha256 per weight file; nothing to verify against")
    for name, digest in hashes.items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise LmforgeError(f"{file} is missing")
        if sha256_file(file) != digest:
            raise LmforgeError(f"{file} does not match the sha256 in {record.name}: it changed after it was "
                               "written (corrupt, truncated or tampered with)")
    return hashes
