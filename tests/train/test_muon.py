"""Muon (train.optimizer: muon): the Newton-Schulz orthogonalization, which tensors it updates,
its step against a hand computation, training with it through the trainer (loss, resume,
two processes under DDP and FSDP2 equal one)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model import Transformer
from lmforge.train.muon import MuonAdamW, is_hidden_matrix, orthogonalize
from lmforge.train.optim import build_optimizer
from tests.train.test_distributed import assert_close, losses, overrides, torchrun, train_here, weights


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 200), (3, 48, 16)])
def test_newton_schulz_gives_a_nearly_orthogonal_matrix(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = orthogonalize(g)
    assert x.shape == g.shape
    singular = torch.linalg.svdvals(x.double())
    # The quintic iteration trades exactness for speed: singular values land in a band around 1,
    # except the few tiny ones of a (near-)square random matrix, which five steps cannot lift.
    assert singular.flatten().quantile(0.05) > 0.6 and singular.max() < 1.3, singular
    # and it keeps the singular vectors: x is close to U V^T of g
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    cos = (x.double() * (u @ vh)).sum((-2, -1)) / (x.double().norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1)))
    assert (cos > 0.95).all(), cos


@pytest.mark.parametrize("family,tied,experts", [("llama", False, 0), ("gpt2", True, 0), ("mixtral", False, 4)])
def test_muon_updates_the_blocks_matrices_and_adamw_the_rest(family, tied, experts):
    extra = {"n_experts": experts, "experts_per_token": 2} if experts else {}
    model = Transformer(ModelConfig(family=family, n_layer=2, n_head=4, d_model=32, vocab_size=64, context=16,
                                    tie_embeddings=tied, **extra))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    by_id = {id(p): name for name, p in model.named_parameters()}
    muon = {by_id[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adamw = {by_id[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon and not muon & adamw
    assert muon | adamw == set(by_id.values())  # every parameter once (a tied head is the embedding)
    assert all(n.startswith("blocks.") and dict(model.named_parameters())[n].dim() >= 2 for n in muon)
    assert "tok_emb.weight" in adamw and not any("router" in n for n in muon)
    assert all("norm" not in n for n in muon)


def test_a_muon_step_equals_the_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                    lr=0.01, momentum=0.9, betas=(0.9, 0.95))
    w0, b0 = w.detach().clone(), b.detach().clone()
    grads = [torch.randn(8, 4) for _ in range(2)]
    buf = torch.zeros(8, 4)
    expected = w0.clone()
    for g in grads:
        w.grad, b.grad = g.clone(), torch.ones(4)
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        nesterov = 0.1 * g + 0.9 * buf
        expected = expected * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(8) * orthogonalize(nesterov)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    # the bias took AdamW steps: with a constant gradient each moves it by lr
    assert torch.allclose(b.detach(), b0 - 2 * 0.01, atol=1e-5)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "momentum_buffer"} and "exp_avg" in state["state"][1]


def test_lr_ratio_lets_the_schedule_drive_muons_own_rate():
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=32, context=8))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=2e-2), torch.device("cpu"))
    assert sorted(g.get("lr_ratio", 1.0) for g in opt.param_groups) == [1.0, 1.0, 20.0]
    assert build_optimizer(model, TrainConfig(), torch.device("cpu")).__class__ is torch.optim.AdamW


def test_bad_muon_settings_are_refused():
    with pytest.raises(ValueError, match="muon_momentum"):
        TrainConfig(optimizer="muon", muon_momentum=1.0)
    with pytest.raises(ValueError, match="muon_lr"):
        TrainConfig(optimizer="muon", muon_lr=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    train_here(overrides(root, "adamw", max_steps=20))
    # at this size Muon wants ten times AdamW's rate (benchmarks/time_to_target.py sweeps it)
    train_here(overrides(root, "muon", optimizer="muon", muon_lr=3e-2, max_steps=20))
    return root


def test_training_with_muon_lowers_the_loss_at_least_as_far_as_adamw(runs):
    adamw, muon = losses(runs, "adamw"), losses(runs, "muon")
    assert muon[-1] < muon[0] - 0.5
    assert sum(muon[-5:]) / 5 <= sum(adamw[-5:]) / 5 + 0.05, (adamw[-5:], muon[-5:])


def test_a_resumed_muon_run_equals_the_uninterrupted_one(runs):
    ov = overrides(runs, "muon-resumed", optimizer="muon", muon_lr=3e-2, max_steps=20, checkpoint_every=100)
    train_here(ov, interrupt_at=7)
    train_here(ov, resume=True)
    a, b = weights(runs, "muon"), weights(runs, "muon-resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(runs, "muon") == losses(runs, "muon-resumed")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_muon_equal_one(runs, parallel):
    if not (runs / "runs" / "muon-8" / "model").is_dir():
        train_here(overrides(runs, "muon-8", optimizer="muon"))
    torchrun(runs, overrides(runs, f"muon-{parallel}", parallel, optimizer="muon"))
    assert_close(weights(runs, "muon-8"), weights(runs, f"muon-{parallel}"))
    assert losses(runs, "muon-8") == pytest.approx(losses(runs, f"muon-{parallel}"), abs=1e-5)


def test_is_hidden_matrix_names():
    w, v = torch.zeros(2, 2), torch.zeros(2)
    assert is_hidden_matrix("blocks.3.attn.qkv.weight", w)
    assert is_hidden_matrix("model.blocks.0.mlp.down.weight", w)
    assert not is_hidden_matrix("blocks.3.norm1.weight", v)
    assert not is_hidden_matrix("tok_emb.weight", w) and not is_hidden_matrix("lm_head.weight", w)
    assert not is_hidden_matrix("blocks.0.moe.router.weight", w)
