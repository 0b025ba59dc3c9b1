"""Hugging Face import and export: every family, logits within 1e-4 both ways."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, FAMILIES, hf_logits, probe_ids, transformers

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.convert import export_model, import_model
from lmforge.model_dir import save_model_dir, verify_model_dir


def logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_matches_transformers(family, hf_dirs, tmp_path):
    hf_model, hf_dir = hf_dirs[family]
    ids = probe_ids()
    expected = hf_logits(hf_model, ids)

    imported = import_model(hf_dir, tmp_path / "imported")
    ours = lmforge.load(imported)
    assert ours.config.family == family
    assert (logits(ours, ids) - expected).abs().max() < 1e-4
    assert ours.tokenizer.chat_template == CHAT_TEMPLATE
    verify_model_dir(imported)

    exported = export_model(imported, "hf", tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf_model).__name__
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4


def test_foreign_directory_loads_directly_and_decodes_like_transformers(hf_dirs):
    hf_model, hf_dir = hf_dirs["llama"]
    ours = lmforge.load(hf_dir)  # sharded, with an index, never imported
    prompt = probe_ids(8, 1)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, 8:].tolist()
    (completion,) = ours.complete([prompt[0].tolist()], max_new_tokens=12, temperature=0.0)
    assert len(completion.token_ids) >= 3  # greedy may stop early at our end-of-text token
    assert completion.token_ids == theirs[:len(completion.token_ids)]


def test_sharded_export_has_an_index_that_transformers_reads(hf_dirs, tmp_path):
    hf_model, hf_dir = hf_dirs["qwen2"]
    ours = lmforge.load(hf_dir)
    out = save_model_dir(ours.model, ours.tokenizer, tmp_path / "sharded", max_shard_bytes=16_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(json.loads((out / "lmforge.json").read_text())["weights"]) == set(index["weight_map"].values())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = probe_ids()
    assert (hf_logits(back, ids) - hf_logits(hf_model, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_import_dtype(dtype, hf_dirs, tmp_path):
    out = import_model(hf_dirs["mistral"][1], tmp_path / dtype, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    loaded = lmforge.load(out)
    assert loaded.model.tok_emb.weight.dtype == getattr(torch, dtype)
    assert lmforge.load(out, dtype=torch.float32).model.tok_emb.weight.dtype == torch.float32


def test_cli_import_and_export(hf_dirs, tmp_path):
    run = [sys.executable, "-m", "lmforge"]
    subprocess.run([*run, "import", str(hf_dirs["gpt2"][1]), "--out", str(tmp_path / "m")], check=True,
                   capture_output=True)
    subprocess.run([*run, "export", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "hf")],
                   check=True, capture_output=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    bad = subprocess.run([*run, "import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_architecture_and_mismatched_config(hf_dirs, tmp_path):
    import shutil

    folder = shutil.copytree(hf_dirs["llama"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(LmforgeError, match="unsupported model_type 'mamba'"):
        lmforge.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(LmforgeError, match="config and weights do not match"):
        lmforge.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(LmforgeError, match="missing .* e.g. model.layers.2"):
        lmforge.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(LmforgeError, match="does not use, e.g. model.layers.1"):
        lmforge.load(folder)
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="lacks 'hidden_size'"):
        lmforge.load(folder)
