"""Supervised fine-tuning: next-token loss on the assistant (completion) tokens only.

The data side (JSONL, chat templates, masking, packing) is `lmforge.data.sft`; this is the task
the fine-tuning loop runs: batches, the masked loss, and validation loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.data.sft import IGNORE, EpochBatches, chunks, collate, load_sft, split_validation, to_rows
from lmforge.train.distributed import BatchShare, weighted
from lmforge.train.losses import language_model_loss


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the targets that are not IGNORE."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


class SFTTask:
    head = None
    task_type = "CAUSAL_LM"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        self.share = share or BatchShare()
        tok, context = loaded.tokenizer, loaded.config.context
        self.pack, self.pad_id = cfg.data.pack, tok.pad_id if tok.pad_id is not None else 0
        self.eval_batches, self.batch_size = cfg.eval.batches, cfg.train.batch_size
        self.loss_chunk = cfg.train.loss_chunk
        examples, stats = load_sft(cfg.data.train, tok, context, cfg.data.on_long)
        log(f"sft data: {stats.describe()}")
        if cfg.data.val:
            train, (val, val_stats) = examples, load_sft(cfg.data.val, tok, context, cfg.data.on_long)
            log(f"sft validation: {val_stats.describe()}")
        else:
            train, val = split_validation(examples, cfg.data.val_fraction, cfg.train.seed)
        self.rows = to_rows(train, context, self.pack)
        self.val_rows = to_rows(val, context, self.pack)
        self.batches = EpochBatches(self.rows, cfg.train.batch_size, cfg.train.seed)
        self.tokens_per_batch = cfg.train.batch_size * max(len(r.inputs) for r in self.rows)
        self.stats = stats

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        b = collate(self.batches.batch(index), self.pad_id, self.pack)
        return self.share.rows(b, counted=b["targets"] != IGNORE)

    def loss(self, model, batch) -> torch.Tensor:
        loss = language_model_loss(model, model.lm_head, batch["input_ids"], batch["targets"], self.loss_chunk,
                                   segment_ids=batch.get("segment_ids"))
        return weighted(loss, batch)

    def evaluate(self, model) -> dict[str, float]:
        if not self.val_rows:
            return {}
        total, count = 0.0, 0
        device = next(model.parameters()).device
        for i, rows in enumerate(chunks(self.val_rows, self.batch_size)):
            if i >= self.eval_batches:
                break
            b = {k: v.to(device) for k, v in collate(rows, self.pad_id, self.pack).items()}
            logits = model(b["input_ids"], segment_ids=b.get("segment_ids"))
            total += masked_lm_loss(logits, b["targets"], reduction="sum").item()
            count += int((b["targets"] != IGNORE).sum())
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def head_record(self) -> dict:
        return {}
