"""Fine-tuning on 2 CPU processes (torchrun, gloo, DDP): each process takes its rows of every
global batch, so the run equals the one-process run (losses, validation, the adapter); only
rank 0 writes; its checkpoints resume on 2 processes and on 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_random_model, small_tokenizer, write_jsonl
from safetensors.torch import load_file

from lmforge.data.sft import IGNORE
from lmforge.errors import TrainingInterrupted
from lmforge.train.distributed import BatchShare, DistContext, weighted
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.metrics import read_metrics

WORKER = """
import json, sys
from lmforge.errors import TrainingInterrupted
from lmforge.train.finetune import finetune, load_finetune_config
raw, resume, interrupt_at = json.loads(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
try:
    finetune(load_finetune_config(None, raw), resume=resume, progress=False, log=lambda *a: None,
             interrupt_at=interrupt_at)
except TrainingInterrupted:
    pass
"""

# Replies of different lengths, so that the two halves of a batch hold different numbers of trained tokens.
REPLIES = {"red": "红色 (red)", "green": "green, 绿色", "blue": "blue", "yes": "yes, the API returns 200 OK",
           "no": "no", "hello": "你好, hello world", "world": "world", "sea": "the sea, 大海, is deep"}


def rows() -> list[dict]:
    return [{"id": f"ex-{i}", "url": f"https://example.com/chat/{i}",
             "messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": reply}]}
            for i, (w, reply) in enumerate(list(REPLIES.items()) * 5)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-finetune")
    tok = small_tokenizer()
    save_random_model(root / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    write_jsonl(root / "chat.jsonl", rows())
    (root / "worker.py").write_text(WORKER)
    return root


def raw_config(root: Path, name: str) -> dict:
    return {"base": str(root / "base"), "data": {"train": str(root / "chat.jsonl")}, "method": "lora",
            "lora": {"r": 4},
            "train": {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "warmup": 1, "log_every": 1, "checkpoint_every": 3,
                      "keep_checkpoints": 2, "device": "cpu", "dtype": "float32"},
            "eval": {"every": 3, "batches": 2}, "run": {"name": name, "out": str(root / "runs")}}


def torchrun(root: Path, raw: dict, resume: bool = False, interrupt_at: int | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "worker.py"), json.dumps(raw), "1" if resume else "0", json.dumps(interrupt_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def here(raw: dict, resume: bool = False, interrupt_at: int | None = None) -> None:
    try:
        finetune(load_finetune_config(None, raw), resume=resume, progress=False, log=lambda *a: None,
                 interrupt_at=interrupt_at)
    except TrainingInterrupted:
        assert interrupt_at is not None


def records(root: Path, name: str) -> tuple[list[float], list[float]]:
    metrics = read_metrics(root / "runs" / name)
    return [r["loss"] for r in metrics if "loss" in r], [r["val_loss"] for r in metrics if "val_loss" in r]


def adapter(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "runs" / name / "adapter" / "adapter_model.safetensors"))


def assert_same_run(root: Path, name: str, reference: str = "one") -> None:
    losses, vals = records(root, name)
    ref_losses, ref_vals = records(root, reference)
    assert len(losses) == 6  # every step once: only rank 0 writes metrics.jsonl
    assert losses == pytest.approx(ref_losses, abs=1e-4)
    # (a run interrupted at an evaluation's step checkpoints instead of evaluating there)
    assert vals[-1] == pytest.approx(ref_vals[-1], abs=1e-4)
    a, b = adapter(root, name), adapter(root, reference)
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_a_batch_share_weights_each_half_to_the_mean_over_the_whole_batch():
    """Two processes' weighted token-mean losses average to the one-process loss, though their rows
    hold different numbers of counted tokens; rows are split in order, nothing is lost."""
    torch.manual_seed(0)
    targets = torch.randint(0, 9, (4, 5))
    targets[0, 1:] = IGNORE  # counted tokens per row: 1, 3, 5, 5
    targets[1, 3:] = IGNORE
    batch = {"logits": torch.randn(4, 5, 9), "targets": targets}

    def loss(b):
        flat = b["logits"].flatten(0, 1), b["targets"].flatten()
        return weighted(torch.nn.functional.cross_entropy(*flat, ignore_index=IGNORE), b)

    whole = BatchShare().rows(batch, counted=targets != IGNORE)
    assert "loss_weight" not in whole and loss(whole) == loss(batch)  # one process: the batch as it is
    halves = [BatchShare(DistContext(rank=r, world=2)).rows(batch, counted=targets != IGNORE) for r in (0, 1)]
    assert torch.equal(torch.cat([h["targets"] for h in halves]), targets)
    assert [float(h["loss_weight"]) for h in halves] == pytest.approx([2 * 4 / 14, 2 * 10 / 14])
    assert (loss(halves[0]) + loss(halves[1])) / 2 == pytest.approx(float(loss(batch)), abs=1e-6)
    assert BatchShare(DistContext(rank=1, world=2)).items(list("abcd")) == ["c", "d"]


def test_nproc_relaunches_the_same_command_without_it():
    from lmforge.train.distributed import without_option

    argv = ["finetune", "lora-sft", "--nproc", "2", "--data", "chat.jsonl", "--nproc=2", "--nproc-x", "1"]
    assert without_option(argv, "--nproc") == ["finetune", "lora-sft", "--data", "chat.jsonl", "--nproc-x", "1"]


def test_fsdp_is_refused_for_fine_tuning(root):
    from lmforge.errors import LmforgeError

    raw = raw_config(root, "fsdp")
    raw["train"]["parallel"] = "fsdp"
    with pytest.raises(LmforgeError, match="train.parallel fsdp shards pretraining only.*use ddp"):
        load_finetune_config(None, raw)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_two_or_one(root):
    here(raw_config(root, "one"))
    torchrun(root, raw_config(root, "two"))
    assert_same_run(root, "two")
    assert records(root, "two")[1] == pytest.approx(records(root, "one")[1], abs=1e-4)  # steps 3 and 6
    run = root / "runs" / "two"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert (run / "summary.json").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 6

    # interrupted at step 3 on 2 processes; resumed on 2, and (a copy) on 1
    torchrun(root, raw_config(root, "resumed"), interrupt_at=3)
    assert (root / "runs" / "resumed" / "latest").resolve().name == "step-000003"
    assert not (root / "runs" / "resumed" / "adapter").exists()
    shutil.copytree(root / "runs" / "resumed", root / "runs" / "resumed-on-one", symlinks=True)
    torchrun(root, raw_config(root, "resumed"), resume=True)
    assert_same_run(root, "resumed")
    here(raw_config(root, "resumed-on-one"), resume=True)
    assert_same_run(root, "resumed-on-one")
