"""The mixture-of-experts MLP (mixtral, qwen3_moe, qwen2_moe): a router picks a few experts per token.

Each token's router logits go through a softmax over all experts; the `experts_per_token`
most probable experts run on it, and their outputs are summed weighted by those
probabilities (renormalized over the chosen ones when `moe_norm_topk`), as transformers'
Mixtral and Qwen3-MoE do. With `moe_shared_d_ff` (Qwen2-MoE) a shared expert runs on every
token too, its output scaled by sigmoid(shared_gate . x). Experts are ordinary SwiGLU MLPs
(nn.Linear layers), so LoRA, quantization and the native decoder see them like any other layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig


class _AddAuxiliaryLoss(torch.autograd.Function):
    """Passes `out` through unchanged and gives `aux` a gradient of 1 in backward: the
    load-balancing loss reaches the router's gradients without changing what the model
    returns or how the training loop computes its loss."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype, ctx.aux_device = aux.dtype, aux.device
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: n_experts * sum over experts of (share of the top-k
    picks it got) * (its mean router probability); 1 per chosen expert when balanced."""
    picks = F.one_hot(chosen, n_experts).float().sum(dim=(0, 1)) / chosen.shape[0]
    return n_experts * (picks * probs.float().mean(dim=0)).sum()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, make_expert: Callable[[int], nn.Module]):
        """`make_expert(hidden)`: a SwiGLU MLP of that hidden size."""
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_per_token
        self.norm_topk, self.aux_coef = cfg.moe_norm_topk, cfg.router_aux_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert(cfg.expert_dim) for _ in range(cfg.n_experts))
        self.shared = make_expert(cfg.moe_shared_d_ff) if cfg.moe_shared_d_ff else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.moe_shared_d_ff else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens x (N, d): router logits (N, n_experts), the chosen experts (N, k) and
        their weights (N, k)."""
        logits = self.router(x)
        probs = F.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, chosen, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, chosen, weights = self.route(flat)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            out = self._dense(flat, chosen, weights)
        else:
            out = torch.zeros_like(flat)
            for e in chosen.unique().tolist():  # only the experts some token chose
                token, slot = (chosen == e).nonzero(as_tuple=True)
                out.index_add_(0, token, self.experts[e](flat[token]) * weights[token, slot, None])
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        if self.training and self.aux_coef > 0:
            probs = F.softmax(logits.float(), dim=-1)
            out = _AddAuxiliaryLoss.apply(out, self.aux_coef * load_balancing_loss(probs, chosen, self.n_experts))
        return out.view_as(x)

    def _dense(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by a gate that is zero where it was not chosen:
        the same sum without data-dependent shapes, for graph exporters and compilers."""
        gate = torch.zeros(flat.shape[0], self.n_experts, dtype=flat.dtype, device=flat.device)
        gate = gate.scatter(1, chosen, weights)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + expert(flat) * gate[:, e:e + 1]
        return out
