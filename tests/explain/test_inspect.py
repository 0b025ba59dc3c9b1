"""Attention weights, logit lens and attributions, checked against the model's own outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.explain.inspect import attention_maps, attributions, logit_lens


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_recomputed_attention_reproduces_the_attention_output(make_model, family):
    model = make_model(family, sliding_window=5) if family == "mistral" else make_model(family)
    ids = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(0))
    maps = attention_maps(model, ids)
    assert maps.shape == (2, 4, 12, 12)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 12))
    assert torch.all(maps.triu(1) == 0)  # causal
    if family == "mistral":
        assert torch.all(maps[..., 11, :7] == 0)  # outside the window of 5
    # weights @ values through the output projection == what the block's attention returned
    seen = {}
    block = model.blocks[1]
    hooks = [block.attn.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))]
    model(ids[None])
    hooks[0].remove()
    attn = block.attn
    _, _, v = attn.qkv(seen["x"]).split([attn.n_head * attn.d, attn.n_kv * attn.d, attn.n_kv * attn.d], -1)
    v = v.view(1, 12, attn.n_kv, attn.d).transpose(1, 2).repeat_interleave(attn.n_head // attn.n_kv, 1)
    y = attn.proj((maps[1][None] @ v).transpose(1, 2).reshape(1, 12, -1))
    assert torch.allclose(y, seen["out"], atol=1e-5)


def test_logit_lens_last_layer_is_the_model_output(make_model):
    model = make_model("llama")
    ids = torch.arange(10)
    rows = logit_lens(model, ids, k=3)
    assert [r.layer for r in rows] == ["embeddings", "block 0", "block 1"]
    probs = model(ids[None])[0].softmax(-1)
    top = probs.topk(3, -1)
    assert [t for t, _ in rows[-1].top[4]] == top.indices[4].tolist()
    assert rows[-1].top[4][0][1] == pytest.approx(top.values[4, 0].item(), rel=1e-5)


FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "phi3"]


def family_model(make_model, family: str, **overrides):
    """Embeddings of a trained model's scale (init 0.2, not 0.02): a path from all-zero
    embeddings then crosses RMSNorm's jump near zero inside a sliver no quadrature point sees."""
    window = {"sliding_window": 5} if family in ("mistral", "phi3") else {}
    return make_model(family, **{"init_std": 0.2, **window, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_completeness_on_every_family(make_model, family):
    model = family_model(make_model, family)
    ids = torch.randint(0, 320, (9,), generator=torch.Generator().manual_seed(3))
    a = attributions(model, ids, steps=32, baseline=0)
    assert a.target == int(model(ids[None])[0, -1].argmax())
    diff = a.score - a.baseline_score
    assert abs(diff) > 0.1
    assert a.integrated_gradients.sum() == pytest.approx(diff, rel=1e-3, abs=1e-5)
    assert a.gradient_x_input.shape == a.integrated_gradients.shape == (9,)
    assert a.baseline_token == 0 and a.steps >= 32
    with torch.no_grad():  # the baseline score is the model's own logit on a prompt of token 0
        assert a.baseline_score == pytest.approx(float(model(torch.zeros(1, 9, dtype=torch.long))[0, -1, a.target]),
                                                 rel=1e-5, abs=1e-5)


def test_integrated_gradients_are_complete_on_a_trained_model(trained_run):
    """The reported failure: a trained llama-family model, end-of-text baseline."""
    import lmforge

    m = lmforge.load(trained_run.model_dir)
    ids = torch.tensor(m.tokenizer.encode("1. The king said to the"))
    a = attributions(m.model, ids, steps=32, baseline=m.tokenizer.eos_id)
    diff = a.score - a.baseline_score
    assert a.integrated_gradients.sum() == pytest.approx(diff, rel=1e-3, abs=1e-5)
    assert a.completeness_gap <= 1e-3 * max(abs(diff), 1e-2)


def test_a_sharp_model_gets_more_quadrature_points(make_model):
    model = family_model(make_model, "llama", init_std=0.3)
    ids = torch.randint(0, 320, (9,), generator=torch.Generator().manual_seed(3))
    few = attributions(model, ids, steps=8, baseline=0, max_steps=8)
    more = attributions(model, ids, steps=8, baseline=0)
    assert few.steps == 8 and 8 < more.steps <= 64
    assert few.completeness_gap > 0.01 * abs(few.score - few.baseline_score)
    assert more.completeness_gap <= 1e-3 * max(abs(more.score - more.baseline_score), 1e-2)


def test_a_baseline_outside_the_vocabulary_is_a_clear_error(make_model):
    with pytest.raises(LmforgeError, match="baseline token 320 is outside the vocabulary"):
        attributions(make_model("llama"), torch.arange(4), baseline=320)


def test_attribution_toward_a_classification_head_label(make_model):
    model = make_model("llama")
    torch.manual_seed(0)
    classifier = nn.Linear(model.config.d_model, 3)
    head = lambda h: classifier(h.mean(1))  # noqa: E731  (mean-pooled sequence classification)
    ids = torch.arange(7)
    a = attributions(model, ids, head=head, steps=32, baseline=0)
    assert a.target == int(head(model.hidden_states(ids[None])).argmax())
    assert a.integrated_gradients.sum() == pytest.approx(a.score - a.baseline_score, rel=1e-3, abs=1e-4)


def test_a_model_without_readable_attention_is_a_clear_error(make_model):
    model = make_model("llama")
    model.blocks[0].attn = nn.Identity()
    with pytest.raises(LmforgeError, match="no attention layers"):
        attention_maps(model, torch.arange(4))
