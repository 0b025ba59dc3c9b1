"""The training loop: it learns, it checkpoints atomically, and an interrupted run resumes exactly."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train


def quiet(*_):
    pass


def run(recipe, **kwargs):
    return train(recipe, progress=False, log=quiet, **kwargs)


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_loss_falls_on_a_tiny_run(trained_run, tokenizer):
    losses = [r["loss"] for r in read_metrics(trained_run.run_dir) if "loss" in r]
    assert len(losses) == 6
    assert losses[0] > 4.0 and losses[-1] < 0.6 * losses[0]
    assert trained_run.val.loss < 0.6 * math.log(tokenizer.vocab_size)
    assert math.isfinite(trained_run.val.bits_per_byte) and trained_run.val.bits_per_byte > 0
    assert trained_run.steps == 30 and trained_run.tokens == 30 * 8 * 32


def test_auto_precision_follows_the_hardware(monkeypatch):
    import contextlib

    from lmforge.train import precision as trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_multiplies_bf16", lambda: True)
    assert trainer.resolve_dtype(cpu, "auto") == "bfloat16"
    assert trainer.resolve_dtype(cpu, "float32") == "float32"
    assert "bf16 autocast" in trainer.precision_note(cpu, "auto")  # said once at the start of a run
    assert trainer.precision_note(cpu, "float32") is None
    monkeypatch.setattr(trainer, "cpu_multiplies_bf16", lambda: False)
    assert trainer.resolve_dtype(cpu, "auto") == "float32"
    assert isinstance(trainer.autocast_for(cpu, "auto"), contextlib.nullcontext)
    assert trainer.precision_note(cpu, "auto") is None
    assert trainer.resolve_dtype(torch.device("cuda"), "auto") == "bfloat16"


def test_bf16_autocast_on_the_cpu_learns(tiny_recipe, tokenizer):
    """bf16 autocast on the CPU (what train.dtype auto picks where the CPU has AVX512-BF16 or
    AMX) learns as the fp32 run of trained_run does, and the saved weights stay fp32."""
    result = run(tiny_recipe("bf16", model={"d_model": 64, "n_head": 4, "n_kv_head": 2},
                             train={"dtype": "bfloat16", "batch_size": 8, "max_steps": 30, "warmup": 5, "lr": 1e-2,
                                    "checkpoint_every": 30, "log_every": 5},
                             eval={"every": 30, "batches": 4}))
    losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[0] > 4.0 and losses[-1] < 0.6 * losses[0]
    assert result.val.loss < 0.6 * math.log(tokenizer.vocab_size)
    assert {t.dtype for t in weights(result.model_dir).values()} == {torch.float32}


def test_run_directory_layout(trained_run):
    d = trained_run.run_dir
    assert (d / "plots" / "loss.png").stat().st_size > 0
    assert (d / "model" / "model.safetensors").is_file()
    records = read_metrics(d)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    # recipe.yaml is the fully resolved recipe: loading it gives the same recipe back.
    recipe = load_recipe(d / "recipe.yaml")
    assert recipe.model.vocab_size == lmforge.load(d / "model").config.vocab
    assert load_recipe(d / "recipe.yaml").to_yaml() == (d / "recipe.yaml").read_text()
    assert not [p.name for p in d.rglob(".*")]  # no temporary files or folders left


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_recipe):
    # Validation mid-run and a regular checkpoint before the interruption must not perturb anything.
    sections = {"train": {"max_steps": 5, "checkpoint_every": 2}, "eval": {"every": 2}}
    full = run(tiny_recipe("full", **sections))
    with pytest.raises(TrainingInterrupted) as info:
        run(tiny_recipe("split", **sections), interrupt_at=3)
    assert info.value.step == 3 and info.value.checkpoint.name == "step-000003"
    split_dir = info.value.checkpoint.parent.parent
    assert (split_dir / "latest").resolve() == info.value.checkpoint
    assert not (split_dir / "model").exists()
    resumed = run(tiny_recipe("split", **sections), resume=True)
    assert resumed.steps == full.steps == 5 and resumed.tokens == full.tokens
    assert_same_weights(resumed.model_dir, full.model_dir)
    assert resumed.val.loss == full.val.loss


def test_checkpoints_latest_link_and_pruning(tiny_recipe):
    result = run(tiny_recipe(train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2}))
    d = result.run_dir
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    link = d / "latest"
    assert link.is_symlink() and str(link.readlink()) == "checkpoints/step-000006"  # relative: the run can move
    ckpt = link.resolve()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "lmforge.json",
                 "trainer.pt"):
        assert (ckpt / name).is_file(), name
    state = torch.load(ckpt / "trainer.pt", weights_only=True)  # no pickled code needed
    assert state["step"] == 6 and "optimizer" in state and "rng_cpu" in state
    assert_same_weights(ckpt, result.model_dir)
    assert lmforge.load(ckpt).config.vocab == lmforge.load(result.model_dir).config.vocab

    keep_all = run(tiny_recipe("all", train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 0}))
    assert len(list((keep_all.run_dir / "checkpoints").iterdir())) == 3


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_recipe):
    recipe = tiny_recipe(train={"max_steps": 2})
    with pytest.raises(LmforgeError, match="nothing to resume"):
        run(recipe, resume=True)
    run(recipe)
    with pytest.raises(LmforgeError, match="--resume"):
        run(tiny_recipe(train={"max_steps": 2}))
    with pytest.raises(LmforgeError, match="different model"):
        run(tiny_recipe(model={"d_model": 64}, train={"max_steps": 4}), resume=True)


def test_time_budget_stops_with_a_checkpoint_and_a_model(tiny_recipe):
    result = run(tiny_recipe(train={"max_steps": 1000, "max_minutes": 1e-6}))
    assert result.steps == 1
    assert (result.run_dir / "latest").resolve().name == "step-000001"
    assert (result.model_dir / "model.safetensors").is_file()


def test_a_run_stopped_before_its_first_log_still_records_its_loss(tiny_recipe):
    result = run(tiny_recipe(train={"max_steps": 1000, "max_minutes": 1e-6, "log_every": 10}))
    assert any("loss" in r for r in read_metrics(result.run_dir))
    assert (result.run_dir / "plots" / "loss.png").is_file()


@pytest.mark.slow
def test_sigint_to_a_real_training_process_checkpoints_and_resumes(cli, tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = ["train", "tiny", "--no-progress", "--run.out", out, "--run.name", "sig", "--data.dir", tiny_data,
            "--model.n_layer", "1", "--model.d_model", "32", "--model.context", "32", "--train.batch_size", "4",
            "--train.max_steps", "100000", "--train.checkpoint_every", "100000", "--train.log_every", "1",
            "--eval.every", "100000"]
    proc = cli(*args, popen=True)
    metrics = out / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    ckpt = (out / "sig" / "latest").resolve()
    step = torch.load(ckpt / "trainer.pt", weights_only=True)["step"]
    assert ckpt.name == f"step-{step:06d}" and step >= 2
    assert (ckpt / "model.safetensors").is_file()

    done = cli("train", out / "sig" / "recipe.yaml", "--resume", "--no-progress", "--train.max_steps", step + 2)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out / 'sig'} from step {step}" in " ".join(done.stdout.split())
    assert max(r["step"] for r in read_metrics(out / "sig")) == step + 2
    assert (out / "sig" / "model" / "model.safetensors").is_file()
