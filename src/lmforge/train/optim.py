"""AdamW with weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from lmforge.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied embeddings appear twice
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass: on CPU too it took a third of the
    # foreach implementation's time per step here (14M parameters, 2 threads).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


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
