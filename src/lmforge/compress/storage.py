"""A quantized model directory: packed integers and scales on disk, back through `lmforge.load`.

Same files as any model directory; `config.json` carries a `quantization_config` and
`load_model_dir` hands such a directory to `load_quantized`. Two layouts:

- compressed-tensors (int8, int4/gptq; the default): Hugging Face tensor names and the
  `pack-quantized` layout transformers and vLLM read (`ecosystem.py`). lmforge converts it
  to its own buffers when loading, exactly.
- lmforge's own (w8a8, GPT-2's Conv1D layers, or `--format lmforge`): `<name>.qweight`
  (int8, or two int4 codes per byte), `<name>.scales`, `<name>.zeros` (int4) and
  `<name>.bias` under our module names; a tied input embedding is not stored (rebuilt from
  the quantized lm_head). Other loaders cannot read these tensors, so config.json names
  the model type `lmforge_quantized` (the family in `lmforge_model_type`): transformers
  refuses an unknown model type with an error, where an unknown quant_method only
  warns and loads random weights.

lmforge.json's `quantization` describes either in lmforge's terms (method, bits,
group_size, algorithm, layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.compress import ecosystem
from lmforge.compress.qlinear import STORED_METHODS, DynamicInt8Linear, QuantizedLinear
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.crypto import ENCRYPTION_FILE
from lmforge.interop.hf import from_hf_config
from lmforge.model import Transformer
from lmforge.model_files import WEIGHTS, load_tokenizer, read_json, sha256_file, weight_files

FORMAT = 1
LAYOUTS = ("compressed-tensors", "lmforge")
NATIVE_MODEL_TYPE = "lmforge_quantized"  # no other loader knows it, so none loads our tensors as random weights
LINEARS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


def linear_names(model: Transformer) -> list[str]:
    """Every matmul of the model, in forward order: the layers quantization replaces. In a
    mixture-of-experts layer each expert's up and down; the router stays as it is (a small
    matrix whose rounding would change which experts run)."""
    names = []
    for i, block in enumerate(model.blocks):
        experts = getattr(block.mlp, "experts", None)
        if experts is None:
            names += [f"blocks.{i}.{part}" for part in LINEARS]
        else:
            names += [f"blocks.{i}.{part}" for part in LINEARS if part.startswith("attn.")]
            names += [f"blocks.{i}.mlp.experts.{e}.{part}" for e in range(len(experts)) for part in ("up", "down")]
            if block.mlp.shared is not None:  # its gate scales the output smoothly: quantized like the rest
                names += [f"blocks.{i}.mlp.shared.up", f"blocks.{i}.mlp.shared.down", f"blocks.{i}.mlp.shared_gate"]
    return names + ["lm_head"]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def empty_layer(method: str, in_features: int, out_features: int, bias: bool, group_size: int) -> nn.Module:
    if method == "w8a8":
        return DynamicInt8Linear(in_features, out_features, bias)
    return QuantizedLinear(in_features, out_features, 4 if method_bits(method) == 4 else 8, group_size, bias)


def method_bits(method: str) -> int:
    return 8 if method in ("int8", "w8a8") else 4


def quantization_config(model: Transformer) -> dict[str, Any] | None:
    return getattr(model, "quantization", None)


def quantized_params(model: Transformer) -> int:
    """Parameters counted as the fp32 model would count them (a quantized layer: in x out)."""
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, DynamicInt8Linear)):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
    if model.config.tie_embeddings and isinstance(model.lm_head, (QuantizedLinear, DynamicInt8Linear)):
        total -= model.tok_emb.weight.numel()  # tied: one matrix, counted once
    return total


def tie_embedding(model: Transformer) -> None:
    """A tied input embedding becomes the quantized lm_head's dequantized weight."""
    model.tok_emb.weight = nn.Parameter(model.lm_head.dequantize(), requires_grad=False)
    model.lm_head.tied = (model.tok_emb.weight,)  # a tuple: not registered as a second parameter


def layout(qcfg: dict[str, Any]) -> str:
    return qcfg.get("layout", "lmforge")


def quantized_hf_config(hf_config: dict[str, Any], model: Transformer) -> dict[str, Any]:
    """config.json of a quantized model: the plain model's `hf_config` plus how its weights are stored."""
    qcfg = quantization_config(model)
    if layout(qcfg) == ecosystem.QUANT_METHOD:
        return {**hf_config, "tie_word_embeddings": False, "quantization_config": ecosystem.quantization_config(qcfg)}
    return {**hf_config, "architectures": ["LmforgeQuantizedForCausalLM"], "model_type": NATIVE_MODEL_TYPE,
            "lmforge_model_type": hf_config["model_type"], "quantization_config": qcfg}


def write_quantized_weights(d: Path, model: Transformer) -> dict[str, str]:
    """The packed codes and scales as one safetensors file in `d`; returns {file: sha256}.

    The rest of the directory (config.json from `quantized_hf_config`, tokenizer,
    lmforge.json) is written by `lmforge.model_dir.write_model_files`."""
    qcfg = quantization_config(model)
    if layout(qcfg) == ecosystem.QUANT_METHOD:
        state = ecosystem.hf_tensors(model)
    else:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("tok_emb.weight")  # rebuilt from lm_head's codes when loading
    save_file(state, str(d / WEIGHTS), metadata={"format": "pt", "lmforge_quantized": json.dumps(qcfg)})
    return {WEIGHTS: sha256_file(d / WEIGHTS)}


def build_quantized(cfg: ModelConfig, qcfg: dict[str, Any], plain: set[str] = frozenset()) -> Transformer:
    """A Transformer whose linears (but those in `plain`) are empty quantized layers of `qcfg`'s method
    (weights on meta)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name in linear_names(model):
        if name in plain:
            continue
        old = model.get_submodule(name)
        set_module(model, name, empty_layer(qcfg["method"], old.in_features, old.out_features,
                                            old.bias is not None, qcfg.get("group_size") or 0))
    model.quantization = qcfg
    return model


def native_state(folder: Path, hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """(config, lmforge's quantization dict, state, unquantized linears) of a directory in lmforge's layout."""
    qcfg = hf_config["quantization_config"]
    if qcfg.get("quant_method") != "lmforge" or qcfg.get("format") != FORMAT:
        raise LmforgeError(f"{folder}: quantization_config {qcfg.get('quant_method')!r} (format {qcfg.get('format')}) "
                           f"is not one lmforge reads; lmforge reads its own and {ecosystem.QUANT_METHOD} "
                           f"({ecosystem.PACKED}) directories")
    if qcfg.get("method") not in STORED_METHODS:
        raise LmforgeError(f"{folder}: unknown quantization method {qcfg.get('method')!r}")
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if plain.get("model_type") == NATIVE_MODEL_TYPE:
        plain["model_type"] = plain.get("lmforge_model_type")
    return from_hf_config(plain), qcfg, tensors, set()


def compressed_tensors_state(folder: Path, hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """(config, lmforge's quantization dict, state, unquantized linears) of a compressed-tensors directory.
    A model lmforge wrote and tied gets its tie back (lmforge.json says so); the stored embedding is
    then the dequantized lm_head, which the tie rebuilds."""
    cfg = from_hf_config({k: v for k, v in hf_config.items() if k != "quantization_config"})
    with torch.device("meta"):
        linears = linear_names(Transformer(cfg))
    state, qcfg, plain = ecosystem.lmforge_state(tensors, cfg, hf_config["quantization_config"], linears, str(folder))
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    stored = meta.get("quantization") or {}
    if stored.get("layout") == ecosystem.QUANT_METHOD and (stored.get("bits"), stored.get("group_size")) == \
            (qcfg["bits"], qcfg["group_size"]):
        qcfg = stored  # lmforge's own record: keeps the algorithm (rtn, gptq)
    if (meta.get("model") or {}).get("tie_embeddings") and "lm_head" not in plain:
        cfg = cfg.model_copy(update={"tie_embeddings": True})
        state.pop("tok_emb.weight")
    return cfg, qcfg, state, plain


def load_quantized(folder: Path, hf_config: dict[str, Any], device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None,
                   key: bytes | None = None) -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    qconfig = hf_config["quantization_config"]
    if not isinstance(qconfig, dict):
        raise LmforgeError(f"{folder}: quantization_config in config.json must be a mapping")
    if dtype not in (None, torch.float32) or torch.device(device).type != "cpu":
        raise LmforgeError("quantized models run on the CPU in fp32 activations; load without dtype/device")
    if qconfig.get("quant_method") not in ("lmforge", ecosystem.QUANT_METHOD):
        raise LmforgeError(f"{folder}: quantization_config {qconfig.get('quant_method')!r} is not one lmforge reads; "
                           f"lmforge reads its own and {ecosystem.QUANT_METHOD} ({ecosystem.PACKED}) directories")
    tensors = read_sealed_tensors(folder, key) if (folder / ENCRYPTION_FILE).is_file() else read_tensors(weight_files(folder))
    reader = compressed_tensors_state if qconfig.get("quant_method") == ecosystem.QUANT_METHOD else native_state
    cfg, qcfg, state, plain = reader(folder, hf_config, tensors)
    del tensors  # the file's own tensors (packed words, a tied embedding's stored copy) go before the model is built
    model = build_quantized(cfg, qcfg, plain)
    expected = model.state_dict()
    if cfg.tie_embeddings and "lm_head" not in plain:
        expected.pop("tok_emb.weight")  # rebuilt from lm_head below
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise LmforgeError(f"{folder}: the weights do not match the quantized config "
                           f"(missing {missing[:1]}, unexpected {extra[:1]}); re-create it with `lmforge quantize`")
    for name, tensor in state.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise LmforgeError(f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_embeddings:
        if "lm_head" in plain:
            model.lm_head.weight = model.tok_emb.weight
        else:
            tie_embedding(model)
    model.init_rope()
    model.eval()
    tokenizer = load_tokenizer(folder)
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return model, tokenizer, meta


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise LmforgeError(f"{path} is corrupt or truncated ({str(e)[:160]}); re-create it") from None
    return tensors


def read_sealed_tensors(folder: Path, key: bytes | None) -> dict[str, torch.Tensor]:
    """Every tensor of an encrypted directory (`lmforge encrypt`), decrypted in memory."""
    from lmforge.interop.crypto import decrypted_source

    source = decrypted_source(folder, key)
    try:
        return {name: source.read(name) for name in source.names()}
    finally:
        source.close()


def stored_weight_bytes(folder: Path) -> int:
    """The size of a model directory's weight files as they are on disk (sealed, if encrypted)."""
    folder = Path(folder)
    if (folder / ENCRYPTION_FILE).is_file():
        files = [folder / sealed for sealed in read_json(folder / ENCRYPTION_FILE).get("files", {}).values()]
    else:
        files = weight_files(folder)
    return sum(f.stat().st_size for f in files)


def check_out(model_dir, out) -> None:
    """Refuse to write a result over its own input (the fp32 model would be gone)."""
    if Path(out).resolve() == Path(model_dir).resolve():
        raise LmforgeError(f"--out {out} is the input model itself; write the result to a new directory")


def is_quantized_dir(path: str | Path) -> dict[str, Any] | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return read_json(config).get("quantization_config")
