"""Encryption at rest: round trips, wrong keys and tampering are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import probe_ids

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.crypto import decrypt_model_dir, encrypt_model_dir, new_key_file
from lmforge.model_dir import save_model_dir, verify_model_dir

pytest.importorskip("cryptography")


@pytest.fixture()
def plain(hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs["llama"][1])
    # Small shards so that several files are sealed and can be swapped.
    return m, save_model_dir(m.model, m.tokenizer, tmp_path / "m", max_shard_bytes=20_000)


def test_round_trip_and_load_with_key(plain, tmp_path):
    m, folder = plain
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    before = {n: (folder / n).read_bytes() for n in weights}
    key = new_key_file(tmp_path / "key")
    assert sorted(encrypt_model_dir(folder, key)) == weights
    assert not list(folder.glob("*.safetensors")) and (folder / "encryption.json").is_file()
    verify_model_dir(folder)  # the sealed files' hashes
    with pytest.raises(LmforgeError, match="is encrypted: give its key"):
        lmforge.load(folder)
    ids = probe_ids()
    with torch.no_grad():
        expected = m.model(ids)
        assert torch.equal(lmforge.load(folder, key=key).model(ids), expected)
        assert torch.equal(lmforge.load(folder, key=key.hex()).model(ids), expected)
    # what `lmforge serve`, chat and eval read when no key is passed (no_grad as `expected`: the
    # inference forward runs fused kernels, equal to the autograd one to rounding, not bits)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setenv("LMFORGE_MODEL_KEY", key.hex())
        assert torch.equal(lmforge.load(folder).model(ids), expected)
    decrypt_model_dir(folder, key)
    assert {n: (folder / n).read_bytes() for n in weights} == before
    verify_model_dir(folder)


def test_wrong_key_and_tampering(plain):
    _, folder = plain
    key = bytes(range(32))
    encrypt_model_dir(folder, key)
    with pytest.raises(LmforgeError, match="wrong key"):
        lmforge.load(folder, key=bytes(32))
    with pytest.raises(LmforgeError, match="32 bytes"):
        lmforge.load(folder, key="not a key")
    sealed = sorted(folder.glob("*.enc"))
    raw = bytearray(sealed[0].read_bytes())
    raw[100] ^= 1
    sealed[0].write_bytes(bytes(raw))
    with pytest.raises(LmforgeError, match="failed authentication .* tampered"):
        lmforge.load(folder, key=key)
    with pytest.raises(LmforgeError, match="failed authentication"):
        decrypt_model_dir(folder, key)
    assert sealed[0].exists()  # nothing replaced by a failed decrypt
    raw[100] ^= 1
    sealed[0].write_bytes(bytes(raw[:-5]))
    with pytest.raises(LmforgeError, match="truncated or tampered"):
        lmforge.load(folder, key=key)
    sealed[0].write_bytes(bytes(raw))
    a, b = sealed[1].read_bytes(), sealed[2].read_bytes()  # two shards swapped
    sealed[1].write_bytes(b)
    sealed[2].write_bytes(a)
    with pytest.raises(LmforgeError, match="failed authentication"):
        lmforge.load(folder, key=key)


def test_cli_encrypt_decrypt_with_env_key(plain, tmp_path):
    _, folder = plain
    run = [sys.executable, "-m", "lmforge"]
    env = {**__import__("os").environ, "MODEL_KEY": "ab" * 32}
    r = subprocess.run([*run, "encrypt", str(folder), "--key-env", "MODEL_KEY"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((folder / "encryption.json").read_text())["algorithm"] == "AES-256-GCM"
    r = subprocess.run([*run, "export", str(folder), "--format", "hf", "--out", str(tmp_path / "o"),
                        "--key-env", "MODEL_KEY"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "decrypt", str(folder), "--key-env", "OTHER"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "OTHER is not set" in r.stderr
    r = subprocess.run([*run, "decrypt", str(folder), "--key-env", "MODEL_KEY"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and not (folder / "encryption.json").exists()
