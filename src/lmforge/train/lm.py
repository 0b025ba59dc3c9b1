"""Language-model pretraining as a task of the one loop (`train.run`): next-token prediction on
prepared token shards, evaluated by perplexity on the validation split."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lmforge.config import Recipe
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.eval.perplexity import EvalResult, evaluate_split
from lmforge.train.losses import language_model_loss
from lmforge.train.precision import autocast_for


class LMTask:
    """Batches of `train.batch_size` windows of the model's context drawn by number (`BatchLoader`),
    each process keeping its `rows`; the loss is `language_model_loss` through `lm_head` (the
    model's own, as `train.loss_chunk` asks); evaluation is perplexity on `eval.batches` batches
    of the val split."""

    def __init__(self, recipe: Recipe, data_dir: Path, lm_head: nn.Linear, device: torch.device, rows: slice):
        tc = recipe.train
        self.seq_len = recipe.model.context
        self.loader = BatchLoader(TokenSplit(data_dir, "train"), tc.batch_size, self.seq_len, tc.seed)
        self.val = TokenSplit(data_dir, "val")
        self.lm_head, self.device, self.rows = lm_head, device, rows
        self.batch_size, self.eval_batches, self.dtype, self.loss_chunk = \
            tc.batch_size, recipe.eval.batches, tc.dtype, tc.loss_chunk
        self.tokens_per_batch = tc.batch_size * self.seq_len

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.batch(index)
        return x[self.rows], y[self.rows]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return language_model_loss(model, self.lm_head, x, y, self.loss_chunk)

    def evaluate(self, model: nn.Module) -> EvalResult:
        return evaluate_split(model, self.val, batch_size=self.batch_size, max_batches=self.eval_batches,
                              seq_len=self.seq_len, autocast=autocast_for(self.device, self.dtype))
