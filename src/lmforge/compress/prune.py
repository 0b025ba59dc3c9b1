"""`lmforge prune`: zero out weights of the block linears (attention qkv/proj, MLP up/down).

- magnitude: drop the weights of smallest |W| in each layer.
- wanda: drop the weights of smallest |W| * ||X_j|| in each output row, where ||X_j|| is
  the norm of input feature j over calibration tokens (Sun et al., 2023): a small weight on
  a loud input matters more than a larger one on a quiet input. Blocks are pruned in order,
  each seeing the outputs of the already-pruned blocks before it.
- pattern 2:4: of every 4 consecutive inputs of a row, keep the 2 highest-scoring (the
  layout sparse tensor cores accelerate); sparsity is then 0.5 by construction.

The embedding and lm_head are left dense. The result is a model directory with the pruning
recorded in lmforge.json; 2:4 layers (and any layer at least 70% sparse) are stored compactly
(`lmforge.compress.sparse`), other zeros densely; `--recover-steps` runs a short
fine-tune on the calibration data with the zeros held at zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.compress.calibration import InputStats, blocks_with_inputs, calibration_tokens, replay
from lmforge.compress.sparse_format import BITMAP_MIN_SPARSITY
from lmforge.compress.storage import LINEARS, check_out, is_quantized_dir
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

PRUNE_METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")


def block_linears(model: Transformer) -> list[str]:
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in LINEARS]


def check_prune_args(model: Transformer, sparsity: float, method: str, pattern: str) -> None:
    if method not in PRUNE_METHODS:
        raise LmforgeError(f"unknown pruning method {method!r}; choose {' or '.join(PRUNE_METHODS)}")
    if pattern not in PATTERNS:
        raise LmforgeError(f"unknown pattern {pattern!r}; choose {' or '.join(PATTERNS)}")
    if pattern == "2:4":
        if sparsity != 0.5:
            raise LmforgeError("the 2:4 pattern is 50% sparse by definition: use --sparsity 0.5")
        for name in block_linears(model):
            k = model.get_submodule(name).in_features
            if k % 4:
                raise LmforgeError(f"{name} has {k} inputs, not divisible by 4: the 2:4 pattern needs groups of 4")
    elif not 0.0 < sparsity < 1.0:
        raise LmforgeError(f"--sparsity must be between 0 and 1 (exclusive), got {sparsity}")


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask of `score` (N, K): True where the weight stays."""
    N, K = score.shape
    if pattern == "2:4":
        groups = score.reshape(N, K // 4, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(N, K)
    if per_row:
        k = int(round(K * sparsity))
        drop = score.topk(k, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    k = int(round(score.numel() * sparsity))
    drop = score.flatten().topk(k, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool).scatter_(0, drop, False).reshape(N, K)


@torch.no_grad()
def prune_model(model: Transformer, sparsity: float, method: str = "magnitude", pattern: str = "unstructured",
                calibration: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Prune in place; returns the keep-mask of every pruned layer."""
    check_prune_args(model, sparsity, method, pattern)
    model.eval()
    masks: dict[str, torch.Tensor] = {}

    def apply(name: str, score: torch.Tensor) -> None:
        layer = model.get_submodule(name)
        masks[name] = prune_mask(score, sparsity, pattern, per_row=method == "wanda")
        layer.weight.mul_(masks[name])

    if method == "magnitude":
        for name in block_linears(model):
            apply(name, model.get_submodule(name).weight.abs())
        return masks
    if calibration is None:
        raise LmforgeError("wanda needs calibration data (--data)")
    for layer, inputs in blocks_with_inputs(model, calibration):
        if layer == len(model.blocks):
            break
        names = [f"blocks.{layer}.{p}" for p in LINEARS]
        stats = InputStats(model, names, gram=False)
        replay(model, layer, inputs)
        stats.close()
        for name in names:
            norm = stats.sq[name].sqrt().float()
            apply(name, model.get_submodule(name).weight.abs() * norm[None, :])
    return masks


def measured_sparsity(model: Transformer) -> float:
    zeros = total = 0
    for name in block_linears(model):
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def recover(model: Transformer, masks: dict[str, torch.Tensor], tokens: torch.Tensor, steps: int,
            lr: float = 1e-4, batch: int = 8) -> list[float]:
    """A short fine-tune on `tokens` that keeps pruned weights at zero; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    layers = {name: model.get_submodule(name) for name in masks}
    losses = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = tokens[torch.randint(0, len(tokens), (batch,), generator=gen)]
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.mul_(masks[name])
        losses.append(loss.item())
    model.eval()
    return losses


def run_prune(model_dir, out, sparsity: float, method: str = "magnitude", pattern: str = "unstructured",
              data=None, samples: int = 128, seq_len: int | None = None, recover_steps: int = 0,
              seed: int = 0) -> dict[str, Any]:
    import lmforge

    check_out(model_dir, out)
    if is_quantized_dir(model_dir) is not None:
        raise LmforgeError(f"{model_dir} is quantized; prune the fp32 model (then quantize the result)")
    m = lmforge.load(model_dir)
    check_prune_args(m.model, sparsity, method, pattern)
    tokens = None
    if method == "wanda" or recover_steps > 0:
        T = min(seq_len or 512, m.config.context)
        tokens = calibration_tokens(data, m.tokenizer, m.config.vocab, samples, T + (1 if recover_steps else 0), seed)
    calibration = tokens[:, :-1] if tokens is not None and recover_steps else tokens
    masks = prune_model(m.model, sparsity, method, pattern, calibration if method == "wanda" else None)
    losses = recover(m.model, masks, tokens, recover_steps) if recover_steps > 0 else []
    actual = measured_sparsity(m.model)
    record = {"method": method, "pattern": pattern, "sparsity": sparsity, "measured_sparsity": round(actual, 6),
              "layers": "attention qkv/proj and MLP up/down of every block", "recover_steps": recover_steps}
    if tokens is not None:
        record["calibration"] = {"data": str(data), "sequences": len(tokens)}
    # 2:4 and very sparse layers are stored compactly (compress/sparse.py); others as dense zeros
    m.model.compact_storage = pattern == "2:4" or sparsity >= BITMAP_MIN_SPARSITY
    m.save(out, pruning=record)
    return {**record, "losses": losses, "out": str(Path(out))}

