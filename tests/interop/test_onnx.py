"""ONNX export: onnxruntime matches the model with and without the KV cache, at any batch/sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, probe_ids

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.onnx_export import export_onnx, io_names

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def empty_past(cfg, batch):
    shape = (batch, cfg.kv_heads, 0, cfg.dim_head)
    return [np.zeros(shape, dtype=np.float32) for _ in range(2 * cfg.n_layer)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_matches_with_and_without_cache(family, hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs[family][1])
    out = export_onnx(m, tmp_path / "onnx")
    s = session(out / "model.onnx")
    inputs, outputs = io_names(m.config.n_layer)
    assert [i.name for i in s.get_inputs()] == inputs and [o.name for o in s.get_outputs()] == outputs
    for batch, split in ((2, 20), (1, 7)):
        ids = probe_ids(24, batch)
        with torch.no_grad():
            ref = m.model(ids).numpy()
        first = s.run(None, {"input_ids": ids[:, :split].numpy(), **dict(zip(inputs[1:], empty_past(m.config, batch)))})
        assert np.abs(first[0] - ref[:, :split]).max() < 1e-4  # no cache (a past of length 0)
        second = s.run(None, {"input_ids": ids[:, split:].numpy(), **dict(zip(inputs[1:], first[1:]))})
        assert np.abs(second[0] - ref[:, split:]).max() < 1e-4  # with the cache
        assert second[1].shape == (batch, m.config.kv_heads, 24, m.config.dim_head)


def test_onnx_greedy_decode_matches_lmforge_and_int8_runs(hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs["llama"][1])
    out = export_onnx(m, tmp_path / "onnx", quantize="int8")
    prompt = probe_ids(6, 1)
    (expected,) = m.complete([prompt[0].tolist()], max_new_tokens=10, temperature=0.0)
    inputs, _ = io_names(m.config.n_layer)
    for name, exact in (("model.onnx", True), ("model.int8.onnx", False)):
        s = session(out / name)
        ids, past, generated = prompt.numpy(), empty_past(m.config, 1), []
        for _ in range(len(expected.token_ids)):
            logits, *past = s.run(None, {"input_ids": ids, **dict(zip(inputs[1:], past))})
            next_id = int(logits[0, -1].argmax())
            generated.append(next_id)
            ids = np.array([[next_id]], dtype=np.int64)
        if exact:
            assert generated == expected.token_ids
        else:  # int8 is lossy: it runs the same graph, and mostly picks the same tokens
            assert sum(a == b for a, b in zip(generated, expected.token_ids)) >= len(generated) // 2
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_onnx_export_errors(hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs["gpt2"][1])
    with pytest.raises(LmforgeError, match="only int8"):
        export_onnx(m, tmp_path / "x", quantize="int4")
    assert not (tmp_path / "x").exists()


def test_quickstart_exports_run(hf_dirs, tmp_path):
    from lmforge.interop.convert import export_for_runtimes
    from lmforge.interop.onnx_run import onnx_generate

    m = lmforge.load(hf_dirs["qwen2"][1])
    lines = export_for_runtimes(hf_dirs["qwen2"][1], tmp_path / "export")
    assert (tmp_path / "export" / "model-q8_0.gguf").is_file() and any("onnx_run" in line for line in lines)
    expected = m.generate("To be", max_new_tokens=12)[0]
    assert onnx_generate(tmp_path / "export" / "onnx", "To be", max_new_tokens=12) == expected
