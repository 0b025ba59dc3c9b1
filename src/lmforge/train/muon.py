"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (momentum orthogonalized by Newton-Schulz) replaces each matrix's momentum by the nearest
semi-orthogonal matrix (approximately U V^T of its SVD), so every direction of the update moves
by the same amount instead of a few dominant ones. Its authors apply it to the 2-D weights
inside the Transformer blocks only; embeddings, the LM head, norms and biases keep AdamW.

The update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it about the RMS of an AdamW
update, so Muon's matrices use the same learning rate and weight decay as AdamW's
(`train.muon_lr` changes it) and the one schedule drives both.

One optimizer object rather than two: the Run, checkpoints and DCP's state-dict helpers see a
single `torch.optim.Optimizer`. It is AdamW (the fused kernel) for the groups not marked
`muon`; the marked groups are updated here, their momentum kept in the same `state`.
"""

from __future__ import annotations

import math
import re

import torch

# the quintic iteration's coefficients chosen by Muon's authors: they push every singular value
# into roughly [0.7, 1.2] in five steps, which is as orthogonal as the update needs to be
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
HIDDEN_MATRIX = re.compile(r"(^|\.)blocks\.\d+\.")
NOT_MUON = ("router",)  # a mixture-of-experts router is a tiny classifier: AdamW, as the head


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of `g`'s SVD (over its last two dimensions, batched over the others)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """True for the parameters Muon updates: weight matrices inside the Transformer blocks."""
    return p.dim() >= 2 and bool(HIDDEN_MATRIX.search(name)) and not any(k in name for k in NOT_MUON)


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose param groups marked `muon: True` take Muon steps (see the module docstring)."""

    def __init__(self, groups: list[dict], *, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, **adamw):
        for group in groups:
            group.setdefault("muon", False)
            if group["muon"]:
                group.update(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(groups, **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        groups = self.param_groups
        try:
            self.param_groups = [g for g in groups if not g["muon"]]
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group["muon"]:
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, decay, m = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                # AdamW's state loader expects a step count in every parameter's state
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - m)
            direction = p.grad.lerp(buf, m) if group["nesterov"] else buf
            update = _orthogonal_update(direction, group["ns_steps"])
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr)


def _orthogonal_update(direction: torch.Tensor, steps: int) -> torch.Tensor:
    """The scaled orthogonalized `direction`; a sharded (DTensor) one is gathered whole first, since
    the iteration needs the full matrix, and the result sharded back as the parameter is."""
    rows, cols = direction.shape[-2:]
    scale = 0.2 * math.sqrt(max(rows, cols))
    if hasattr(direction, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        full = orthogonalize(direction.full_tensor(), steps) * scale
        return distribute_tensor(full, direction.device_mesh, direction.placements)
    return orthogonalize(direction, steps) * scale
