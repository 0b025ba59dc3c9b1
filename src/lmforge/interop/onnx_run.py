"""Greedy generation from an exported ONNX directory with onnxruntime (no torch model needed).

    python -m lmforge.interop.onnx_run runs/quickstart/export/onnx --prompt "ROMEO:" --max-tokens 48
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError


def onnx_generate(folder: str | Path, prompt: str, max_new_tokens: int = 48, model_file: str = "model.onnx") -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        raise LmforgeError("running ONNX needs onnxruntime: pip install 'lmforge[onnx]'") from None
    folder = Path(folder)
    spec = json.loads((folder / "lmforge_onnx.json").read_text())
    tokenizer = TextTokenizer.load(folder)
    session = ort.InferenceSession(str(folder / model_file), providers=["CPUExecutionProvider"])
    dtype = {"float32": np.float32, "float16": np.float16}.get(spec["dtype"], np.float32)
    past = [np.zeros((1, spec["kv_heads"], 0, spec["head_dim"]), dtype) for _ in spec["inputs"][1:]]
    ids = np.array([tokenizer.encode(prompt) or [spec["eos_token_id"]]], dtype=np.int64)
    out: list[int] = []
    while len(out) < max_new_tokens and ids.shape[1] + past[0].shape[2] < spec["context"]:
        logits, *past = session.run(None, {"input_ids": ids, **dict(zip(spec["inputs"][1:], past))})
        token = int(logits[0, -1].argmax())
        if token == spec["eos_token_id"]:
            break
        out.append(token)
        ids = np.array([[token]], dtype=np.int64)
    return tokenizer.decode(out, skip_special=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model-file", default="model.onnx", help="model.onnx or model.int8.onnx")
    args = ap.parse_args()
    print(args.prompt + onnx_generate(args.folder, args.prompt, args.max_tokens, args.model_file))


if __name__ == "__main__":
    main()
