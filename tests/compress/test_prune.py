"""Pruning: exact sparsity and 2:4 patterns, Wanda against magnitude, reload, bad input."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.compress.prune import block_linears, measured_sparsity, prune_mask, prune_model, run_prune
from lmforge.errors import LmforgeError


def test_unstructured_mask_has_exactly_the_requested_sparsity():
    score = torch.rand(64, 96)
    keep = prune_mask(score, 0.3, "unstructured", per_row=False)
    assert int((~keep).sum()) == round(64 * 96 * 0.3)
    assert score[~keep].max() <= score[keep].min()  # the smallest scores went
    keep = prune_mask(score, 0.5, "unstructured", per_row=True)
    assert bool(((~keep).sum(dim=1) == 48).all())


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    score = torch.rand(8, 32)
    keep = prune_mask(score, 0.5, "2:4", per_row=True)
    groups, kept = score.reshape(8, 8, 4), keep.reshape(8, 8, 4)
    assert bool((kept.sum(-1) == 2).all())
    assert torch.equal(groups.topk(2, dim=-1).indices.sort(-1).values, kept.nonzero()[:, -1].reshape(8, 8, 2))


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                            ("magnitude", "2:4"), ("wanda", "2:4")])
def test_pruned_model_has_the_pattern_and_reloads(tiny_model_dir, tiny_data, tmp_path, method, pattern):
    out = tmp_path / "pruned"
    r = run_prune(tiny_model_dir, out, 0.5, method, pattern, data=tiny_data, samples=32)
    assert r["measured_sparsity"] == pytest.approx(0.5, abs=1e-9)
    m = lmforge.load(out)
    assert measured_sparsity(m.model) == pytest.approx(0.5, abs=1e-9)
    for name in block_linears(m.model):
        w = m.model.get_submodule(name).weight
        if pattern == "2:4":
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    assert m.meta["pruning"]["method"] == method
    assert isinstance(m.generate(["the"], max_new_tokens=4)[0], str)


def test_wanda_beats_magnitude_when_inputs_differ_in_scale(make_model):
    torch.manual_seed(0)
    model = make_model("llama", n_layer=1, d_model=64, context=32)
    # Calibration tokens whose embeddings have a few very loud features, as trained models do.
    with torch.no_grad():
        model.tok_emb.weight[:, :8] *= 20
    calibration = torch.randint(0, model.config.vocab, (32, 32))
    layer = model.get_submodule("blocks.0.mlp.up")
    x = model.blocks[0].norm2(model.tok_emb(calibration)).detach()
    dense = layer(x).detach()

    def error(method):
        pruned = make_model("llama", n_layer=1, d_model=64, context=32)
        pruned.load_state_dict(model.state_dict())
        prune_model(pruned, 0.5, method, "unstructured", calibration)
        return ((pruned.get_submodule("blocks.0.mlp.up")(x) - dense).norm() / dense.norm()).item()

    assert error("wanda") < error("magnitude")


def test_recovery_fine_tune_keeps_the_zeros(tiny_model_dir, tiny_data, tmp_path):
    r = run_prune(tiny_model_dir, tmp_path / "p", 0.5, "magnitude", data=tiny_data, samples=32, recover_steps=4)
    assert len(r["losses"]) == 4
    assert measured_sparsity(lmforge.load(tmp_path / "p").model) >= 0.5 - 1e-9


def test_bad_pruning_requests_are_clear_errors(tiny_model_dir, tmp_path, make_model):
    for sparsity in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(LmforgeError, match="between 0 and 1"):
            run_prune(tiny_model_dir, tmp_path / "p", sparsity)
    with pytest.raises(LmforgeError, match="50% sparse"):
        run_prune(tiny_model_dir, tmp_path / "p", 0.6, pattern="2:4")
    with pytest.raises(LmforgeError, match="calibration data"):
        run_prune(tiny_model_dir, tmp_path / "p", 0.5, "wanda")
    with pytest.raises(LmforgeError, match="not divisible by 4"):
        prune_model(make_model("llama", d_model=32, d_ff=30), 0.5, "magnitude", "2:4")
    assert not (tmp_path / "p").exists()


def test_cli_prune(cli, tiny_model_dir, tiny_data, tmp_path):
    r = cli("prune", tiny_model_dir, "--sparsity", "0.5", "--method", "wanda", "--pattern", "2:4",
            "--data", tiny_data, "--samples", "16", "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert "50.0%" in r.stdout
    r = cli("prune", tiny_model_dir, "--sparsity", "2", "--out", tmp_path / "q")
    assert r.returncode == 2 and "between 0 and 1" in r.stderr
