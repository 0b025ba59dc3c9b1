"""What a fine-tuning run leaves behind and how it is configured: an override changes only the key
it names, summary.json is written (so `lmforge plot` sees a finished run), early stopping ends
the run at the right evaluation, and a corrupt checkpoint is passed over on resume."""

from __future__ import annotations

import json

import pytest
from helpers import save_random_model, small_tokenizer, write_jsonl

from lmforge.config import load_recipe
from lmforge.errors import TrainingInterrupted
from lmforge.eval.compute import describe_run
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.metrics import read_metrics

WORDS = ["red", "green", "blue", "yes", "no", "hello", "world", "sea"]


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture
def base_and_data(tmp_path, tok):
    base = save_random_model(tmp_path / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size)
    rows = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in WORDS * 4]
    return base, write_jsonl(tmp_path / "train.jsonl", rows)


def test_an_override_changes_only_the_key_it_names(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: models/base\ndata: {train: chat.jsonl}\nmethod: lora\n")
    cfg = load_finetune_config(str(recipe), ["--train.max_steps", "3", "--run.out", "elsewhere",
                                             "--eval.batches", "2"])
    t = cfg.train
    assert t.max_steps == 3
    # the fine-tuning defaults, not pretraining's (lr 3e-3, warmup 100, batch 16, weight decay 0.1)
    assert (t.lr, t.warmup, t.batch_size, t.weight_decay, t.checkpoint_every) == (1e-4, 10, 8, 0.0, 100)
    assert (cfg.run.name, cfg.run.out) == ("finetune", "elsewhere")
    assert (cfg.eval.every, cfg.eval.batches) == (50, 2)
    # a key the recipe sets stays the recipe's; the override of another key does not reset it
    recipe.write_text("base: models/base\ndata: {train: chat.jsonl}\ntrain: {lr: 2.0e-3}\n")
    t = load_finetune_config(str(recipe), ["--train.warmup", "5"]).train
    assert (t.lr, t.warmup, t.batch_size, t.weight_decay) == (2e-3, 5, 8, 0.0)
    # pretraining recipes, whose sections default to the class defaults, are unchanged
    r = load_recipe("tiny", ["--train.max_steps", "3"])
    assert r.train.max_steps == 3 and r.train.lr == load_recipe("tiny").train.lr


def test_finetune_writes_summary_so_plot_sees_a_finished_run(tmp_path, base_and_data, cli):
    base, data = base_and_data
    run = cli("finetune", base, "--data", data, "--method", "lora", "--name", "ft", "--run.out", tmp_path / "runs",
              "--train.max_steps", "4", "--train.device", "cpu", "--no-progress")
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "runs" / "ft"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stop_reason"] == "max_steps"
    assert summary["task"] == "sft" and summary["method"] == "lora"
    assert summary["tokens"] > 0 and summary["total_flops"] > 0 and summary["energy_kwh"] > 0
    assert "did not finish" not in describe_run(run_dir)
    shown = cli("plot", run_dir, "--out", tmp_path / "plots")
    assert shown.returncode == 0, shown.stderr
    assert "did not finish" not in shown.stdout and "FLOPs" in shown.stdout


def _config(tmp_path, base, data, name, **train):
    raw = {"base": str(base), "data": {"train": str(data)}, "method": "lora",
           "train": {"max_steps": 40, "lr": 3e-3, "warmup": 2, "checkpoint_every": 100, "keep_checkpoints": 1,
                     "device": "cpu", "dtype": "float32", "log_every": 1, **train},
           "eval": {"every": 2, "batches": 2}, "run": {"name": name, "out": str(tmp_path / "runs")}}
    return load_finetune_config(None, raw)


def test_finetune_stops_early_and_keeps_the_best_adapter_checkpoint(tmp_path, base_and_data):
    base, data = base_and_data
    # min_delta 100: after the first evaluation nothing counts as an improvement, so with patience 2
    # the run ends at the third evaluation (step 6) whatever the losses are
    lines = []
    result = finetune(_config(tmp_path, base, data, "early", early_stop_patience=2, early_stop_min_delta=100.0),
                      progress=False, log=lines.append)
    run_dir = result.run_dir
    assert result.steps == 6
    assert [r["step"] for r in read_metrics(run_dir) if "val_loss" in r] == [2, 4, 6]
    assert any(line.startswith("early stop at step 6: validation loss did not improve by more than 100 in 2 "
                               "evaluations") for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["best"]["step"] == 2
    first_val = next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r)
    assert summary["best"]["val_loss"] == pytest.approx(first_val)
    assert (run_dir / "best").resolve().name == "step-000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000006"]
    assert (run_dir / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    assert (result.output / "adapter_config.json").is_file()

    # interrupted after the evaluation at step 4 and resumed: the count goes on from the checkpoint
    cfg = _config(tmp_path, base, data, "early-resumed", early_stop_patience=2, early_stop_min_delta=100.0)
    with pytest.raises(TrainingInterrupted):
        finetune(cfg, progress=False, log=lambda *_: None, interrupt_at=5)
    resumed = finetune(cfg, resume=True, progress=False, log=lambda *_: None)
    assert resumed.steps == 6
    assert json.loads((resumed.run_dir / "summary.json").read_text())["best"]["step"] == 2


def test_finetune_resume_passes_over_a_corrupt_checkpoint(tmp_path, base_and_data):
    base, data = base_and_data
    cfg = _config(tmp_path, base, data, "corrupt", max_steps=6, checkpoint_every=2, keep_checkpoints=3)
    finetune(cfg, progress=False, log=lambda *_: None)
    trainable = cfg.run.dir / "checkpoints" / "step-000006" / "trainable.safetensors"
    data_bytes = bytearray(trainable.read_bytes())
    data_bytes[-8] ^= 0x01
    trainable.write_bytes(bytes(data_bytes))
    lines = []
    cfg = _config(tmp_path, base, data, "corrupt", max_steps=8, checkpoint_every=2, keep_checkpoints=3)
    resumed = finetune(cfg, resume=True, progress=False, log=lines.append)
    assert any("step-000006/trainable.safetensors does not match the sha256" in line for line in lines)
    assert f"resuming {cfg.run.dir} from step 4 (step-000004)" in lines
    assert resumed.steps == 8
    assert [r["step"] for r in read_metrics(cfg.run.dir) if "loss" in r] == list(range(1, 9))
