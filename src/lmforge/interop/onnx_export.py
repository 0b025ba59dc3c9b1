"""ONNX export: one decoder graph with KV-cache inputs and outputs, for onnxruntime.

Inputs:  input_ids (batch, sequence) int64; past_key_values.{i}.key / .value
         (batch, kv_heads, past_sequence, head_dim) for every layer.
Outputs: logits (batch, sequence, vocab); present.{i}.key / .value, the past with this
         step's keys and values appended (batch, kv_heads, past_sequence + sequence, head_dim).

Batch, sequence and past_sequence are dynamic. The first step passes a past of length 0,
later steps feed the presents back (the names follow Hugging Face Optimum's, so its
runtimes read them). Positions are counted from the past's length, so rows of a batch
share one length: no padding. The graph is traced from the same `Transformer` through a
concatenating cache (`ConcatCache`), so there is no second model to keep in step.
With `quantize="int8"`, onnxruntime's dynamic quantization turns the MatMul weights into int8.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer

MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"
OPSET = 18


class ConcatCache:
    """The KVCache interface, functional: each layer's past and this step's keys/values concatenated."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = past[0][0].shape[2]
        self.has_padding = False

    def positions(self, pad_mask, t: int) -> torch.Tensor:
        batch = self.past[0][0].shape[0]
        return (torch.arange(t, device=self.past[0][0].device) + self.length)[None].expand(batch, t)

    def attention_mask(self, t: int, window: int | None) -> torch.Tensor:
        device = self.past[0][0].device
        q = torch.arange(t, device=device)[:, None] + self.length
        k = torch.arange(self.length + t, device=device)[None]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        return allowed[None, None]  # (1, 1, t, past + t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        past_k, past_v = self.past[layer]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.present.append((k, v))
        return k, v

    def advance(self, t: int) -> None:
        pass


class DecoderWithCache(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        cache = ConcatCache(list(zip(past[0::2], past[1::2])))
        logits = self.model(input_ids, kv_cache=cache)
        return (logits, *[t for kv in cache.present for t in kv])


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def empty_past(model: Transformer, batch: int, length: int = 0) -> list[torch.Tensor]:
    cfg = model.config
    dtype = model.tok_emb.weight.dtype
    return [torch.zeros(batch, cfg.kv_heads, length, cfg.dim_head, dtype=dtype) for _ in range(2 * cfg.n_layer)]


def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise LmforgeError("ONNX export needs onnx and onnxscript: pip install 'lmforge[onnx]'") from None


def export_onnx(loaded, out: str | Path, quantize: str | None = None) -> Path:
    """Write `out/model.onnx` (and `model.int8.onnx` with quantize="int8") plus the tokenizer files."""
    from lmforge.model_dir import atomic_directory

    _onnx_modules()
    if quantize not in (None, "int8"):
        raise LmforgeError(f"--quantize {quantize!r}: only int8 (dynamic) quantization is offered")
    model: Transformer = loaded.model.eval()
    cfg = model.config
    inputs, outputs = io_names(cfg.n_layer)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    example_ids = torch.zeros(2, 3, dtype=torch.long)
    example_past = empty_past(model, 2, 4)
    dynamic = ({0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in example_past))  # *past is one argument
    with atomic_directory(out) as d:
        exporter_log = logging.getLogger("torch.onnx")
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)  # its notes on missing torchvision ops, axis names, deprecations
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(DecoderWithCache(model).eval(), (example_ids, *example_past),
                                            input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                            opset_version=OPSET, dynamo=True, verbose=False)
        finally:
            exporter_log.setLevel(level)
        program.save(str(d / MODEL_FILE))
        if quantize == "int8":
            quantize_int8(d / MODEL_FILE, d / QUANTIZED_FILE)
        loaded.tokenizer.save(d, model_max_length=cfg.context)
        (d / "lmforge_onnx.json").write_text(json.dumps({
            "inputs": inputs, "outputs": outputs, "n_layer": cfg.n_layer, "kv_heads": cfg.kv_heads,
            "head_dim": cfg.dim_head, "context": cfg.context, "vocab_size": cfg.vocab,
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
            "eos_token_id": loaded.tokenizer.eos_id}, indent=2))
    return Path(out)


def quantize_int8(src: Path, dst: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise LmforgeError("int8 quantization of ONNX needs onnxruntime: pip install 'lmforge[onnx]'") from None
    with tempfile.TemporaryDirectory() as tmp:  # quantize_dynamic writes helper files beside its input
        staged = Path(tmp) / src.name
        shutil.copy(src, staged)
        for extra in src.parent.glob(src.name + ".data"):
            shutil.copy(extra, Path(tmp) / extra.name)
        quantize_dynamic(str(staged), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
