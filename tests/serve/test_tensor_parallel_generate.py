"""Generation with the model split over 2 CPU processes (`lmforge generate --tp 2`, gloo): each
rank holds half the heads (and half of the KV cache's key/value heads), half the MLP and half
the vocabulary; rank 0 decodes and the other rank follows. Logits of a padded batch's prefill and
of each cached decoding step equal one process's within 1e-5, and the CLI writes the text one
process writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow

# One torchrun job (2 gloo ranks) runs both checks below, as starting one costs seconds:
# sys.argv[1] is the tiny llama of the decoding check, the rest are the models of the shard check.
SCRIPT = """
import json, sys, torch
import torch.distributed as dist
import lmforge
from lmforge.serve import tensor_parallel as tpg

device = tpg.join(2)
results = {}
whole = lmforge.load(sys.argv[1]).model.eval()
model = tpg.load_split(sys.argv[1], device).model  # this rank's rows alone, read from the files
if dist.get_rank() != 0:
    tpg.follow(model)
else:
    split = tpg.SplitModel(model)
    ids = torch.tensor([[0, 0, 5, 9, 17, 3], [7, 8, 2, 4, 11, 6]])
    pad = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    worst = 0.0
    with torch.inference_mode():
        c1, c2 = whole.new_cache(2, 16), split.new_cache(2, 16)
        a, b = whole(ids, c1, pad_mask=pad, last_only=True), split(ids, c2, pad_mask=pad, last_only=True)
        for step in range(6):
            worst = max(worst, (a - b).abs().max().item())
            nxt = a[:, -1].argmax(-1)[:, None]
            a, b = whole(nxt, c1, last_only=True), split(nxt, c2, last_only=True)
        try:  # longer than the context: refused on every rank before any collective; the next call goes on
            split(torch.zeros(1, 100, dtype=torch.long))
            refused = False
        except ValueError:
            refused = True
        nxt = a[:, -1].argmax(-1)[:, None]
        after = (whole(nxt, c1, last_only=True) - split(nxt, c2, last_only=True)).abs().max().item()
    split.close()
    results["decoding"] = {"worst": worst, "scale": a.abs().max().item(), "refused": refused, "after": after,
                           "kv_heads": [c1.k[0].shape[1], c2.k[0].shape[1]]}  # (batch, heads, capacity, dim)

ids = torch.tensor([[3, 9, 17, 4, 11, 6, 2, 8]])
for folder in sys.argv[2:]:
    whole = lmforge.load(folder).model.eval()
    part = tpg.load_split(folder, device).model
    local = {n: tuple(p.to_local().shape) for n, p in part.named_parameters()}
    with torch.inference_mode():
        worst = (whole(ids) - part(ids).full_tensor()).abs().max().item()
    held = sum(p.to_local().numel() for p in part.parameters())
    results[folder] = {"worst": worst, "held": held, "whole": sum(p.numel() for p in whole.parameters()),
                       "qkv": local["blocks.0.attn.qkv.weight"], "emb": local["tok_emb.weight"]}
if dist.get_rank() == 0:
    print(json.dumps(results))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def split_run(tiny_model_dir, tokenizer, make_config, tmp_path_factory):
    """The script's run: (its stderr, its results, the shard check's model folders, their vocabulary).

    The shard check's models: gpt2 (Conv1D weights stored transposed, learned positions, biases,
    tied embeddings), qwen3 (q/k norms) and gemma3 ((1 + w) norms), with a vocabulary that does
    not split evenly."""
    import torch

    from lmforge.model import Transformer
    from lmforge.model_dir import save_model_dir

    tmp_path = tmp_path_factory.mktemp("tp")
    vocab = tokenizer.vocab_size + (1 - tokenizer.vocab_size % 2)  # odd: rank 0 holds one more row
    folders = []
    for family in ("gpt2", "qwen3", "gemma3"):
        torch.manual_seed(0)
        model = Transformer(make_config(family, vocab_size=vocab, context=64))
        folders.append(str(save_model_dir(model, tokenizer, tmp_path / family)))
    script = tmp_path / "split.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tiny_model_dir), *folders], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(results)
    return proc.stderr, results, folders, vocab


def test_split_logits_equal_one_process(split_run):
    stderr, results = split_run[:2]
    result = results["decoding"]
    assert result["worst"] < 1e-5 and result["scale"] > 0.01
    assert result["refused"] and result["after"] < 1e-5  # an error on every rank leaves them in step
    assert "rank 1: forward: ValueError" in stderr  # the follower logged it and went on
    assert result["kv_heads"] == [2, 1]  # each rank caches its own key/value head


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600)


def test_generate_tp_writes_what_one_process_writes(tiny_model_dir):
    prompts = ["-p", "Chapter 1. The queen", "-p", "2. A fool and his"]
    one = lmforge("generate", str(tiny_model_dir), *prompts, "--max-tokens", "16", "--reference-path")
    split = lmforge("generate", str(tiny_model_dir), *prompts, "--max-tokens", "16", "--tp", "2")
    assert one.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    assert "Chapter 1. The queen" in one.stdout and len(one.stdout.splitlines()) >= 4
    assert split.stdout == one.stdout  # rank 0 alone prints


@pytest.mark.parametrize("args,message", [
    (["--tp", "0"], "--tp must be at least 1"),
    (["--tp", "2", "--adapter", "some-adapter"], "--tp does not apply --adapter"),
])
def test_bad_tp_is_one_line(tiny_model_dir, monkeypatch, capsys, args, message):
    from lmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["lmforge", "generate", str(tiny_model_dir), "-p", "x", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "\n" not in err


def test_each_rank_reads_its_shard_and_logits_equal_one_process(split_run):
    """Each rank holds only its rows of every model, and the split model's logits equal the whole model's."""
    _, results, folders, vocab = split_run
    for folder in folders:
        r = results[folder]
        assert r["worst"] < 1e-5, (folder, r)
        assert r["emb"] == [vocab // 2 + 1, 32]
        assert r["held"] < 0.6 * r["whole"]  # its half of the matrices, plus the replicated norms
    assert results[folders[0]]["qkv"] == [48, 32]  # gpt2: 4 heads x 8 of q, k and v, half of each
    assert results[folders[1]]["qkv"] == [16 + 8 + 8, 32]  # 2 of 4 query heads, 1 of 2 key/value heads
