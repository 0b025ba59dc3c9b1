"""The fused inference forward (model/fused.py, native/prefill.c): the same logits as the plain
forward in every family, with and without a KV cache and in chunks; each kernel against
PyTorch on the default build and on the AVX2 one forced with -march=haswell; the PyTorch
path where the kernels are missing; training never reaches the fused path."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Family
from lmforge.infer.chunked_prefill import prefill
from lmforge.model import fused
from lmforge.native import onednn
from lmforge.model.transformer import RMSNorm, rotate_half

FAMILIES = get_args(Family)
V = 320  # tiny_config's vocabulary
WINDOWED = {"mistral": {"sliding_window": 8}, "phi3": {"sliding_window": 8}}


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def plain_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The forward with autograd on: PyTorch's own ops throughout (what training runs)."""
    with torch.enable_grad():
        return model(ids).detach()


@pytest.fixture(params=["native", "haswell"])
def lib(request, use_kernels):
    """The kernels built for -march=<param>, in place of the default ones for this test."""
    loaded = use_kernels(request.param)
    assert fused.kernels() is loaded
    assert loaded.prefill_supported() == (256 if request.param == "haswell" else
                                          512 if "avx512f" in open("/proc/cpuinfo").read() else 256)
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_forward_gives_the_plain_logits(make_model, family):
    model = make_model(family, init_std=0.3, context=64, **WINDOWED.get(family, {}))
    ids = random_ids(2, 40)
    plain = plain_logits(model, ids)
    with torch.inference_mode():
        whole = model(ids)
        cached = prefill(model, ids, model.new_cache(2, 64), chunk=None, all_logits=True)
        chunked = prefill(model, ids, model.new_cache(2, 64), chunk=13, all_logits=True)
    for out in (whole, cached, chunked):
        torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)


def test_the_llama_forward_runs_the_kernels_and_they_change_rounding_only(make_model, monkeypatch):
    """Without the kernels (PyTorch's ops, the mask-free chunk attention kept) the logits are
    the plain ones to fp32 rounding too, and each kernel really ran on the fused path."""
    model = make_model("llama", init_std=0.3, context=64)
    ids = random_ids(1, 48, seed=3)
    plain = plain_logits(model, ids)
    calls: dict[str, int] = {}
    lib = fused.kernels()
    assert lib is not None, "the native kernels did not build here"

    class Counting:
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(lib, name)

    monkeypatch.setattr(fused, "kernels", lambda: Counting())
    with torch.inference_mode():
        chunked = prefill(model, ids, model.new_cache(1, 64), chunk=16, all_logits=True)
    n, kv = model.config.n_layer, model.config.kv_heads
    assert calls == {"rmsnorm_rows": 3 * (2 * n + 1), "rope_rows": 3 * n, "silu_mul_rows": 3 * n,
                     "causal_softmax_rows": 3 * n * kv}  # one block of 16 queries per KV head
    torch.testing.assert_close(chunked, plain, atol=2e-5, rtol=1e-4)
    monkeypatch.setattr(fused, "kernels", lambda: None)
    with torch.inference_mode():
        fallback = prefill(model, ids, model.new_cache(1, 64), chunk=16, all_logits=True)
    torch.testing.assert_close(fallback, plain, atol=2e-5, rtol=1e-4)


def test_training_never_reaches_the_fused_path(make_model, monkeypatch):
    model = make_model("llama").train()
    ids = random_ids(2, 24)
    expected_loss = None
    for kernels in (fused.kernels, lambda: pytest.fail("a training step reached the fused kernels")):
        monkeypatch.setattr(fused, "kernels", kernels)
        model.zero_grad()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        if expected_loss is None:
            expected_loss, expected_grad = loss.item(), model.blocks[0].attn.qkv.weight.grad.clone()
    assert loss.item() == expected_loss  # bit-identical with or without the kernels present
    assert torch.equal(model.blocks[0].attn.qkv.weight.grad, expected_grad)


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    with torch.enable_grad():  # RMSNorm's own PyTorch ops
        norm = RMSNorm(x.shape[-1], eps)
        norm.weight.data.copy_(w)
        return norm(x).detach()


@pytest.mark.parametrize("dim", [384, 100, 7])  # whole vectors, a tail, only the tail
def test_rms_norm_and_the_residual_add_fused_into_it(lib, dim):
    g = torch.Generator().manual_seed(dim)
    x, a = torch.randn(3, 70, dim, generator=g) * 3, torch.randn(3, 70, dim, generator=g)
    w = torch.rand(dim, generator=g) + 0.5
    with torch.inference_mode():
        y = fused.rms_norm(x, w, 1e-5)
        s, y2 = fused.add_rms_norm(x, a, w, 1e-5)
    torch.testing.assert_close(y, reference_rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-5)
    assert torch.equal(s, x + a)
    torch.testing.assert_close(y2, reference_rms_norm(x + a, w, 1e-5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 36, 10])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_rotates_the_query_and_key_heads_in_place(lib, head_dim, per_row):
    B, T, heads, kv = 2, 33, 4, 2
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(B, T, (heads + 2 * kv) * head_dim, generator=g)
    angles = torch.rand(B if per_row else 1, T, head_dim // 2, generator=g) * 40
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1  # a YaRN-like attention factor in the tables
    rope = (cos[:, None], sin[:, None]) if per_row else (cos[0], sin[0])  # (B, 1, T, d) or (T, d)
    expected = qkv.clone().view(B, T, heads + 2 * kv, head_dim)
    rotated = expected[:, :, :heads + kv].transpose(1, 2)
    rotated = (rotated * rope[0] + rotate_half(rotated) * rope[1]).transpose(1, 2)
    expected[:, :, :heads + kv] = rotated
    with torch.inference_mode():
        assert fused.rope_applies(qkv, rope)
        fused.rope_(qkv, heads + kv, head_dim, rope)
    torch.testing.assert_close(qkv, expected.view(B, T, -1), atol=2e-6, rtol=1e-5)
    assert torch.equal(qkv.view(B, T, -1, head_dim)[:, :, heads + kv:], expected[:, :, heads + kv:])  # values untouched


@pytest.mark.parametrize("hidden", [1024, 100, 5])
def test_silu_times_up(lib, hidden):
    g = torch.Generator().manual_seed(hidden)
    h = torch.randn(2, 40, 2 * hidden, generator=g) * 6
    h[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # where exp over- and underflows
    with torch.inference_mode():
        out = fused.silu_mul(h, hidden)
    gate, up = h.split(hidden, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-6, rtol=1e-5)


def test_the_kernels_split_rows_over_threads_to_the_same_result(lib, monkeypatch):
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(0))
    w = torch.ones(512)
    with torch.inference_mode():
        one = fused.rms_norm(x, w, 1e-6)
        monkeypatch.setattr(fused, "PARALLEL_MIN", 1)
        with_threads = fused.rms_norm(x, w, 1e-6)
    assert torch.equal(one, with_threads)


def test_a_chunk_mask_after_a_cached_prefix_becomes_causal_after(make_model):
    model = make_model("llama", context=64)
    cache = model.new_cache(2, 64)
    cache.positions(None, 20)
    cache.advance(20)
    cache.positions(None, 12)  # as a forward does: the chunk's slots marked, then its masks
    mask = cache.attention_mask(12, None)
    with torch.inference_mode():
        shape = fused.causal_after(mask, 12)
        assert shape is not None and shape.start == 20
        assert torch.equal(shape.dense(12, "cpu").expand_as(mask), mask)
        assert fused.causal_after(cache.attention_mask(12, 16), 12) is None  # a sliding window hides more
        assert fused.causal_after(None, 12) is None
        padded = model.new_cache(2, 64)
        padded.positions(torch.tensor([[False] * 5 + [True] * 15, [True] * 20]), 20)
        padded.advance(20)
        padded.positions(None, 12)
        assert fused.causal_after(padded.attention_mask(12, None), 12) is None  # a padded row hides more
    assert fused.causal_after(mask, 12) is None  # autograd on: the mask is left to SDPA


@pytest.mark.parametrize("scale", [None, 0.2])
def test_causal_after_attention_without_the_kernels_equals_sdpa_with_the_mask(monkeypatch, scale):
    monkeypatch.setattr(fused, "kernels", lambda: None)  # the two flash calls merged
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 9, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    shape = fused.CausalAfter(21)
    with torch.inference_mode():
        merged = fused.attention(q, k, v, shape, False, 0.0, True, scale)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=shape.dense(9, "cpu"), enable_gqa=True, scale=scale)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-5)


def test_linear_through_onednn_equals_the_layer_and_keeps_hooks():
    assert onednn.AVAILABLE, "this torch build has no oneDNN linear"
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40)
    x = torch.randn(2, 30, 96)
    with torch.inference_mode():
        y = fused.linear(layer, x)
        torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
        seen = []
        handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(out) or out * 2)
        hooked = fused.linear(layer, x)
        handle.remove()
    assert len(seen) == 1 and torch.equal(hooked, seen[0] * 2)  # a hooked layer runs its own forward
    with torch.enable_grad():  # autograd on: the layer's own forward, gradients and all
        out = fused.linear(layer, x)
        out.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("start,T", [(0, 45), (21, 30), (40, 1)])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_blocked_causal_attention_equals_sdpa(lib, monkeypatch, start, T, scale):
    """Blocks of 16 queries (a last one short), 6 query heads over 2 KV heads, two rows."""
    monkeypatch.setattr(fused, "ATTENTION_BLOCK", 16)
    g = torch.Generator().manual_seed(start + T)
    q = torch.randn(2, 6, T, 24, generator=g) * 2
    k, v = torch.randn(2, 2, start + T, 24, generator=g) * 2, torch.randn(2, 2, start + T, 24, generator=g)
    mask = fused.CausalAfter(start).dense(T, "cpu")
    with torch.inference_mode():
        y = fused.attention(q, k, v, fused.CausalAfter(start) if start else None, start == 0, 0.0, True, scale)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=scale)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert y.transpose(1, 2).is_contiguous()  # (B, T, h, d) in memory: the output projection's input as it is
