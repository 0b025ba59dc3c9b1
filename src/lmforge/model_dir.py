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
import hashlib
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

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".enc", *PICKLE_SUFFIXES)  # `.enc`: interop/crypto.py's sealed shards
MAX_SHARD_BYTES = 4 << 30


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
        from lmforge.compress.storage import quantized_params, write_quantized_weights

        hf_config["quantization_config"] = quantization
        hashes, parameters = write_quantized_weights(d, model), quantized_params(model)
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


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model directory (the shards, in index order, when sharded)."""
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map_index = _index(folder)
        return [folder / n for n in sorted(set(weight_map_index.values()))]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / "dcp" / ".metadata").is_file():  # train/checkpoint.py's sharded (multi-process) checkpoint
        raise LmforgeError(f"{folder} is a sharded training checkpoint, not a model directory: make one with "
                           f"`lmforge export-checkpoint {folder} --out DIR`")
    if pickle_files(folder):
        raise LmforgeError(f"{folder} holds only pickle weights ({pickle_files(folder)[0].name}), which can run "
                           "code when loaded. lmforge reads safetensors; if you trust the file, pass "
                           "--allow-pickle (allow_pickle=True) to read it with torch.load(weights_only=True)")
    raise LmforgeError(f"no {WEIGHTS} in {folder}; is this a model directory?")


def _index(folder: Path) -> dict[str, str]:
    weight_map_index = read_json(folder / WEIGHTS_INDEX).get("weight_map")
    if not isinstance(weight_map_index, dict) or not weight_map_index:
        raise LmforgeError(f"{folder / WEIGHTS_INDEX} has no weight_map")
    for name, file in weight_map_index.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise LmforgeError(f"{folder / WEIGHTS_INDEX}: tensor {name!r} points at {file!r}, "
                               "not a .safetensors file in this directory")
    return weight_map_index


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


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
    return SafetensorsFiles(files, _index(folder) if (folder / WEIGHTS_INDEX).is_file() else None)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   allow_pickle: bool = False,
                   key: bytes | str | None = None) -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    """Load any model directory: ours, a Hugging Face one of a supported family, or an encrypted one (+ key)."""
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
    cfg: ModelConfig = from_hf_config(hf_config)
    model = load_weights(weight_source(folder, allow_pickle, key), cfg, dtype).to(device)
    tokenizer = load_tokenizer(folder)
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return model, tokenizer, meta


def refuse_links_out(folder: Path) -> None:
    """A model directory's files other than weights (configuration, tokenizer, chat template)
    must be its own: through a symlink out of it, a downloaded model would have lmforge read
    any file the user can, render it as a template, serve it (/tokenizer_info) and copy it
    into the models it imports. Weights may be links (they are only ever read as tensors)."""
    if not folder.is_dir():
        return
    root = folder.resolve()
    for entry in folder.iterdir():
        if not entry.is_symlink() or entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise LmforgeError(f"{entry} is a link to {target}, outside the model directory; lmforge reads a "
                               "model's configuration, tokenizer and chat template only from its own directory: "
                               "copy the files in (cp -rL DIR NEW_DIR copies a directory with its links followed)")


def load_tokenizer(folder: Path) -> TextTokenizer:
    """tokenizer.json + tokenizer_config.json; newer transformers keep the chat template in chat_template.jinja."""
    refuse_links_out(folder)
    tokenizer = TextTokenizer.load(folder)
    template = folder / "chat_template.jinja"
    if tokenizer.chat_template is None and template.is_file():
        tokenizer.config["chat_template"] = template.read_text()
    return tokenizer


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
