"""The optimizer (AdamW, or Muon + AdamW) with weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from lmforge.config import TrainConfig
from lmforge.train.muon import MuonAdamW, is_hidden_matrix


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (train.optimizer adamw), or Muon for the blocks' weight matrices and AdamW for the rest
    (muon, `lmforge.train.muon`). Weight decay applies to matrices only. Each group's `lr_ratio`
    is its learning rate over train.lr, which the schedule multiplies."""
    seen: set[int] = set()
    hidden, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear twice
            continue
        seen.add(id(p))
        if cfg.optimizer == "muon" and is_hidden_matrix(name, p):
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass: on CPU too it took a third of the
    # foreach implementation's time per step here (14M parameters, 2 threads).
    fused = device.type in ("cpu", "cuda")
    adamw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "fused": fused}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
    groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "muon": True, "lr_ratio": muon_lr / cfg.lr})
    return MuonAdamW([g for g in groups if g["params"]], momentum=cfg.muon_momentum, **adamw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine / warmup-stable-decay / constant down to lr * min_lr_ratio."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr + (floor - cfg.lr) * min(1.0, progress)
