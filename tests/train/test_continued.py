"""Continued pretraining (`lmforge train RECIPE --init-from MODEL_DIR`): the model's config,
tokenizer and weights are the start, raw text is prepared with the model's tokenizer, and
data prepared with another tokenizer is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import prepare, read_index
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import evaluate_split
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train

# New text the model has not seen: a Chinese technical note with English terms, and an English one.
NOTE_ZH = ("在 PyTorch 中，混合精度训练（mixed precision）通常使用 bfloat16 进行前向计算，同时保留 float32 的主权重。"
           "梯度累积（gradient accumulation）可以在显存有限时模拟更大的 batch size。\n"
           "学习率预热（warmup）之后采用余弦衰减（cosine decay），训练更稳定。检查点（checkpoint）应当原子地写入。\n")
NOTE_EN = ("A checkpoint is written under a temporary name and renamed once complete, so a crash never leaves "
           "a half-written one. The optimizer state, the RNG state and the data cursor travel with the weights.\n")


@pytest.fixture
def new_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text((NOTE_ZH + NOTE_EN) * 40, encoding="utf-8")
    return path


def batch_loss(model, x, y) -> float:
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item()


def test_continued_pretraining_starts_from_the_model_and_lowers_its_loss_on_new_text(trained_run, tiny_recipe,
                                                                                     new_text):
    start = trained_run.model_dir
    lines = []
    recipe = tiny_recipe("continued", data={"dir": None, "corpus": str(new_text)},
                         train={"init_from": str(start), "max_steps": 30, "lr": 3e-3, "warmup": 2, "batch_size": 8,
                                "checkpoint_every": 30, "log_every": 1}, eval={"every": 1000, "batches": 4})
    result = train(recipe, progress=False, log=lines.append)
    initial = lmforge.load(start)
    # the model's own config and tokenizer, the raw text prepared with that tokenizer
    final = lmforge.load(result.model_dir)
    assert final.config.model_dump() == initial.config.model_dump()
    assert (final.path / "tokenizer.json").read_text() == (start / "tokenizer.json").read_text()
    assert any("replaces the recipe's model section" in line for line in lines)
    data_dir = result.run_dir.parent / "data" / f"notes.txt-tok-{start.name}"
    assert read_index(data_dir)["settings"]["tokenizer"] == str(start)
    assert lmforge.load(result.model_dir).meta["parents"] == [str(start)]

    # the first step's loss is the loaded model's loss on that batch: the weights really were loaded
    x, y = BatchLoader(TokenSplit(data_dir, "train"), 8, initial.config.context, 0).batch(0)
    first = next(r["loss"] for r in read_metrics(result.run_dir) if r["step"] == 1)
    assert first == pytest.approx(batch_loss(initial.model.eval(), x, y), abs=1e-4)
    torch.manual_seed(0)
    fresh = type(initial.model)(initial.config).eval()
    assert abs(first - batch_loss(fresh, x, y)) > 0.3  # a model that was not loaded would not match

    # and training on the new text lowers the loss there
    before = evaluate_split(initial.model.eval(), TokenSplit(data_dir, "val"), batch_size=8, max_batches=4,
                            seq_len=initial.config.context)
    assert result.val.loss < before.loss - 0.5
    assert math.isfinite(result.val.loss)


def test_data_prepared_with_another_tokenizer_is_refused(trained_run, tiny_recipe, new_text, tmp_path, cli):
    other = prepare(DataConfig(corpus=str(new_text), tokenizer=TokenizerConfig(vocab_size=400)), tmp_path / "other")
    recipe = tiny_recipe("refused", data={"dir": str(other)}, train={"init_from": str(trained_run.model_dir)})
    with pytest.raises(LmforgeError, match=rf"{other} was prepared with another tokenizer than "
                                           rf"{trained_run.model_dir}'s; prepare the text with the model's"):
        train(recipe, progress=False, log=lambda *_: None)
    r = cli("train", "tiny", "--init-from", trained_run.model_dir, "--data.dir", other, "--run.out", tmp_path / "r")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "was prepared with another tokenizer" in " ".join(r.stderr.split())
    with pytest.raises(LmforgeError, match="data.tokenizer.path .* is not .*'s tokenizer"):
        train(tiny_recipe("refused2", data={"dir": None, "corpus": str(new_text), "tokenizer": {"path": str(other)}},
                          train={"init_from": str(trained_run.model_dir)}), progress=False, log=lambda *_: None)
    with pytest.raises(LmforgeError, match="not a model directory"):
        train(tiny_recipe("refused3", train={"init_from": str(tmp_path)}), progress=False, log=lambda *_: None)
