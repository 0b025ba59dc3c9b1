"""The Transformer itself: causality per family, the sliding window, GQA, and hand-counted sizes."""

from __future__ import annotations

from typing import get_args

import pytest
import torch


from lmforge.config import Family

FAMILIES = get_args(Family)
V = 320  # tiny_config's vocabulary


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_future_tokens_never_change_past_logits(make_model, family):
    extra = {"sliding_window": 8} if family in ("mistral", "phi3") else {}
    model = make_model(family, **extra)
    x = random_ids(2, 32)
    with torch.no_grad():
        base = model(x)
        for cut in (1, 9, 31):
            changed = x.clone()
            changed[:, cut:] = random_ids(2, 32 - cut, seed=cut)
            out = model(changed)
            torch.testing.assert_close(out[:, :cut], base[:, :cut], atol=1e-6, rtol=0)
            # ...and the changed token itself does matter from its own position on.
            assert not torch.allclose(out[:, cut], base[:, cut])


def test_mistral_sliding_window_limits_what_each_position_sees(make_model):
    # One layer with a window of 4: position t sees tokens t-3..t only.
    model = make_model("mistral", n_layer=1, sliding_window=4)
    x = random_ids(1, 20)
    changed = x.clone()
    changed[0, 5] = (x[0, 5] + 1) % V
    with torch.no_grad():
        base, out = model(x), model(changed)
    diff = (out - base).abs().amax(-1)[0]
    assert diff[:5].max() == 0  # before the change
    assert (diff[5:9] > 0).all()  # inside the window
    torch.testing.assert_close(out[0, 9:], base[0, 9:], atol=1e-6, rtol=0)  # out of the window


def test_window_larger_than_sequence_is_plain_causal(make_model):
    windowed = make_model("mistral", sliding_window=64)
    plain = make_model("mistral")
    x = random_ids(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(windowed(x), plain(x), atol=1e-6, rtol=0)


def test_num_params_matches_a_hand_count(make_model):
    # llama: V=320, d=32, 2 layers, 4 heads of 8, 2 kv heads, SwiGLU hidden 64*ceil(8*32/3/64) = 128, tied.
    per_layer = 2 * 32 + 32 * (4 + 2 * 2) * 8 + 32 * 32 + 32 * 2 * 128 + 128 * 32  # norms, qkv, o, gate+up, down
    assert make_model("llama").num_params() == 320 * 32 + 2 * per_layer + 32
    # gpt2: biases everywhere, LayerNorm with bias, learned positions (context 32), MLP 4*d = 128.
    per_layer = 2 * (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    gpt2 = make_model("gpt2")
    assert gpt2.num_params() == 320 * 32 + 32 * 32 + 2 * per_layer + 2 * 32
    assert gpt2.num_params(non_embedding=True) == 2 * per_layer + 2 * 32
    # qwen2 adds q/k/v biases; untied embeddings add an lm_head.
    assert make_model("qwen2").num_params() == make_model("llama").num_params() + 2 * (4 + 2 * 2) * 8
    assert make_model("llama", tie_embeddings=False).num_params() == make_model("llama").num_params() + 320 * 32


def test_flops_per_token_matches_a_hand_count(make_model):
    model = make_model("llama")
    linear_weights = 2 * (32 * 64 + 32 * 32 + 32 * 256 + 128 * 32) + 320 * 32  # per-layer matmuls + lm_head
    attention = 2 * 2 * 2 * 32 * 4 * 8  # QK^T and AV: 2 FLOPs * 2 matmuls * layers * keys * heads * head_dim
    forward = 2 * linear_weights + attention
    assert model.flops_per_token(training=False) == forward
    assert model.flops_per_token() == 3 * forward
    assert model.flops_per_token(seq_len=16, training=False) == 2 * linear_weights + attention // 2


def test_grouped_query_attention_shapes(make_model):
    model = make_model("llama", n_head=4, n_kv_head=1, head_dim=16)  # multi-query, head_dim != d_model / n_head
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 1) * 16, 32)
    assert attn.proj.weight.shape == (32, 4 * 16)
    cache = model.new_cache(batch=3, capacity=10)
    assert cache.k[0].shape == (3, 1, 10, 16)
    with torch.no_grad():
        assert model(random_ids(3, 7), cache).shape == (3, 7, V)
    assert cache.length == 7


def test_gqa_equals_multi_head_attention_with_shared_kv_heads(make_model):
    """Query head h reads kv head h // (n_head / n_kv_head), as in Hugging Face's repeat_kv."""
    gqa = make_model("llama", n_head=4, n_kv_head=2)
    mha = make_model("llama", n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    d = 8
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([4 * d, 2 * d, 2 * d])
        repeat = lambda t: t.view(2, d, -1).repeat_interleave(2, dim=0).reshape(4 * d, -1)  # noqa: E731
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    x = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=0)


def test_longer_than_context_is_refused(make_model):
    with pytest.raises(ValueError, match="context"):
        make_model("llama")(random_ids(1, 33))


@pytest.mark.parametrize("bad", [dict(d_model=30, n_head=4), dict(n_kv_head=3), dict(family="gpt2", n_kv_head=2),
                                 dict(family="llama", sliding_window=4), dict(family="gpt2", tie_embeddings=False)])
def test_inconsistent_model_configs_are_refused(make_config, bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_config(**bad)


def test_native_gelu_equals_pytorch_forward_and_backward():
    """The gpt2 family's GELU runs as a C kernel on the CPU in fp32 and bf16; it agrees with
    F.gelu(approximate="tanh") and its autograd, and fp16 takes PyTorch's op."""
    import torch.nn.functional as F

    from lmforge import native
    from lmforge.model import activations

    assert native.elementwise() is not None
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (300, 1000)]:  # one thread with a scalar tail; the threaded path
        x = (torch.randn(*shape, generator=g) * 4).requires_grad_()
        dy = torch.randn(*shape, generator=g)
        assert activations._native_applies(x.detach())
        y = activations.gelu_tanh(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        ref = F.gelu(x, approximate="tanh")
        (ref_dx,) = torch.autograd.grad(ref, x, dy)
        assert (y - ref).abs().max().item() < 2e-6 and (dx - ref_dx).abs().max().item() < 2e-5
    # bf16 (what autocast hands the MLP): equal to PyTorch's bf16 op within bf16 rounding
    x = (torch.randn(300, 1000, generator=g) * 4).bfloat16().requires_grad_()
    dy = torch.randn(300, 1000, generator=g).bfloat16()
    assert activations._native_applies(x.detach())
    y = activations.gelu_tanh(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = F.gelu(x, approximate="tanh")
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    assert y.dtype == dx.dtype == torch.bfloat16
    assert ((y.float() - ref.float()).abs() / (ref.float().abs() + 1e-2)).max().item() < 8e-3
    assert ((dx.float() - ref_dx.float()).abs() / (ref_dx.float().abs() + 1e-2)).max().item() < 2e-2
    assert not activations._native_applies(torch.randn(4, dtype=torch.float16))
    assert not activations._native_applies(torch.randn(4, 4).t())  # not contiguous
