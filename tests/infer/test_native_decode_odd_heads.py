"""The native decoder at odd head dims, on the AVX2 build (-march=haswell) and the AVX-512 one:
head_dim 9 leaves a one-float tail after an AVX2 vector and is shorter than an AVX-512 one; 17
leaves a tail of one after a whole vector of either. RoPE turns pairs of dimensions, so at an odd
head_dim it is not defined, and the model's configuration refuses it."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import Transformer

from test_native_decode import prompt, stepwise_logits


@pytest.mark.parametrize("build", ["haswell", "skylake-avx512"])
@pytest.mark.parametrize(("d_model", "n_head"), [(36, 4), (51, 3)], ids=["head_dim9", "head_dim17"])
def test_odd_head_dims_give_the_reference_logits(use_kernels, make_config, build, d_model, n_head):
    use_kernels(build)
    torch.manual_seed(0)
    model = Transformer(make_config("gpt2", vocab_size=331, d_model=d_model, n_head=n_head, d_ff=100, context=48,
                                    init_std=0.1)).eval()
    assert model.config.dim_head % 2 == 1
    one = stepwise_logits(model, prompt(5, 331), prompt(12, 331, seed=2))
    six = stepwise_logits(model, [prompt(n, 331, seed=10 + n) for n in (3, 7, 5, 9, 2, 6)], prompt(8, 331, seed=3))
    for ref, got in (one, six):
        assert ref.abs().max() > 1.0  # logits of a real size, not all near zero (rounding: ~1e-6 at even dims too)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_at_an_odd_head_dim_is_refused_by_the_config(make_config, family):
    with pytest.raises(ValueError, match=r"needs an even head_dim, not 9"):
        make_config(family, d_model=36, n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match=r"needs an even head_dim, not 9"):
        make_config(family, head_dim=9)
    assert make_config(family, d_model=40, n_head=4, n_kv_head=2).dim_head == 10
