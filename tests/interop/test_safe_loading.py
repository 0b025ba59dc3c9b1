"""Hostile and damaged files: one clear LmforgeError, never a crash, a huge allocation, or code run."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import hf_logits, probe_ids

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.safetensors_io import read_header
from lmforge.model_dir import verify_model_dir


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(path: Path, header, data: bytes, raw_header: bytes | None = None) -> None:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture()
def model_dir(hf_dirs, tmp_path):
    return Path(shutil.copytree(hf_dirs["qwen2"][1], tmp_path / "m"))


def test_pickle_is_refused_unless_allowed_and_then_weights_only(hf_dirs, tmp_path):
    hf_model, hf_dir = hf_dirs["llama"]
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, folder / name)
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="pickle weights .* can run code .* --allow-pickle"):
        lmforge.load(folder)
    ids = probe_ids()
    loaded = lmforge.load(folder, allow_pickle=True)
    assert (loaded.model(ids) - hf_logits(hf_model, ids)).abs().max() < 1e-4


class Exploit:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['LMFORGE_PWNED'], 'w').write('pwned')",))


def test_a_pickle_that_runs_code_is_refused_even_when_allowed(hf_dirs, tmp_path, monkeypatch):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(hf_dirs["llama"][1] / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": Exploit()}, folder / "pytorch_model.bin")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LMFORGE_PWNED", str(marker))
    with pytest.raises(LmforgeError, match="weights-only"):
        lmforge.load(folder, allow_pickle=True)
    assert not marker.exists()


def test_cli_explains_the_pickle_refusal(hf_dirs, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(hf_dirs["gpt2"][1] / "config.json", folder / "config.json")
    torch.save({}, folder / "model.ckpt")
    r = subprocess.run([sys.executable, "-m", "lmforge", "import", str(folder), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "can run code" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_lying_header_length_is_refused_before_allocation(model_dir):
    weights = model_dir / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])
    with pytest.raises(LmforgeError, match="header claims 1,152,921,504,606,846,976 bytes"):
        lmforge.load(model_dir)


@pytest.mark.parametrize("mutate, message", [
    (lambda h, k, o: h[k].update(data_offsets=[0, 10**15]), "outside the"),
    (lambda h, k, o: h[k].update(data_offsets=[x - 4 for x in h[k]["data_offsets"]]), "overlaps"),
    (lambda h, k, o: h[k].update(shape=[2**40, 2**40]), "bytes, but its data_offsets span"),
    (lambda h, k, o: h[k].update(dtype="F64"), "bytes, but its data_offsets span"),
    (lambda h, k, o: h[k].update(dtype="Q4"), "unknown dtype"),
    (lambda h, k, o: h[k].update(shape=[-1]), "invalid shape"),
    (lambda h, k, o: h[k].update(data_offsets=[5, "x"]), "invalid data_offsets"),
    (lambda h, k, o: h[k].pop("dtype"), "must have exactly"),
    (lambda h, k, o: h.update(__metadata__={"a": 1}), "__metadata__"),
])
def test_hostile_headers(model_dir, mutate, message):
    weights = model_dir / "model.safetensors"
    header, data = split_file(weights)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    mutate(header, names[-1], names[0])
    write_file(weights, header, data)
    with pytest.raises(LmforgeError, match=message) as e:
        lmforge.load(model_dir)
    assert str(weights) in str(e.value)


def test_truncated_file_and_wrong_dtype(model_dir):
    weights = model_dir / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-100])
    with pytest.raises(LmforgeError, match="data section"):
        lmforge.load(model_dir)
    weights.write_bytes(raw[:5])
    with pytest.raises(LmforgeError, match="only 5 bytes"):
        lmforge.load(model_dir)
    weights.write_bytes(raw)
    header, data = split_file(weights)
    name = next(n for n in header if n.endswith("embed_tokens.weight"))
    header[name]["dtype"] = "I32"
    write_file(weights, header, data)
    with pytest.raises(LmforgeError, match="must be floating point"):
        lmforge.load(model_dir)


def test_an_index_pointing_elsewhere_is_refused(hf_dirs, tmp_path):
    folder = Path(shutil.copytree(hf_dirs["llama"][1], tmp_path / "m"))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, actual = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != actual)
    index["weight_map"][name] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(LmforgeError, match="not a .safetensors file in this directory"):
        lmforge.load(folder)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(LmforgeError, match="the index says tensor"):
        lmforge.load(folder)


def test_fuzzed_headers_only_ever_raise_lmforge_error(model_dir):
    """Random byte flips, insertions and truncations of the header: a clean error or a clean load."""
    weights = model_dir / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    for _ in range(300):
        blob = bytearray(raw[:8 + n])
        for _ in range(rng.randint(1, 4)):
            op, i = rng.random(), rng.randrange(len(blob))
            if op < 0.5:
                blob[i] = rng.randrange(256)
            elif op < 0.7:
                blob[i:i] = bytes([rng.choice(b'0123456789,:[]{}"-e')])
            elif op < 0.85:
                del blob[i]
            else:
                digits = [j for j in range(8, len(blob)) if 48 <= blob[j] <= 57]
                j = rng.choice(digits)
                blob[j:j + 1] = str(rng.choice([0, 9, 99999, 2**63, 2**64 + 1])).encode()
        if rng.random() < 0.5:
            blob[:8] = struct.pack("<Q", len(blob) - 8)  # keep the length consistent, so the JSON is what is fuzzed
        weights.write_bytes(bytes(blob) + raw[8 + n:rng.choice([len(raw), len(raw) - rng.randrange(1, 64)])])
        try:
            read_header(weights)
            lmforge.load(model_dir)
            outcomes["loaded"] += 1
        except LmforgeError:
            outcomes["error"] += 1
    assert outcomes["error"] > 200


def test_verify_detects_a_changed_weight_file(hf_dirs, tmp_path):
    out = lmforge.load(hf_dirs["gpt2"][1]).save(tmp_path / "m")
    assert list(verify_model_dir(out)) == ["model.safetensors"]
    weights = out / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # a flipped bit in the data: the header is still valid, only the hash can tell
    weights.write_bytes(bytes(raw))
    lmforge.load(out)
    with pytest.raises(LmforgeError, match="does not match the sha256"):
        verify_model_dir(out)
    r = subprocess.run([sys.executable, "-m", "lmforge", "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "sha256" in r.stderr
