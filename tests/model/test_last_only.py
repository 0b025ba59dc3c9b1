"""`last_only` forwards: the last block runs for the last token alone, with the same logits and
the same KV cache as the whole forward, under every kind of attention mask."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from lmforge.config import Family
from lmforge.infer.chunked_prefill import prefill

V = 320  # tiny_config's vocabulary
FAMILIES = get_args(Family)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def window(family: str) -> dict:
    """A sliding window of 8 where the family has one (gemma2/3: on the first of the two layers)."""
    if family in ("mistral", "phi3"):
        return {"sliding_window": 8}
    if family in ("gemma2", "gemma3"):
        local = {"rope_local_theta": 10000.0} if family == "gemma3" else {}
        return {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], **local}
    return {}


@pytest.mark.parametrize("family", FAMILIES)
def test_last_only_equals_the_whole_forward_without_a_cache(make_model, family):
    model = make_model(family, **window(family))
    x = random_ids(2, 20)
    with torch.no_grad():
        full = model(x)
        last = model(x, last_only=True)
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "qwen3", "mixtral"])
@pytest.mark.parametrize("chunk", [None, 7])  # 7: a first causal chunk, then chunks after cached tokens
def test_last_only_prefill_keeps_every_key_and_value(make_model, family, chunk):
    """Chunked or not, with left padding in the batch: the logits of the last position and every
    layer's cached keys and values are those of the whole forward."""
    model = make_model(family, **window(family))
    ids = random_ids(2, 19, seed=3)
    pad = torch.ones(2, 19, dtype=torch.bool)
    pad[1, :5] = False  # row 1 is a 14-token prompt, left-padded
    for pad_mask in (None, pad):
        whole, last = model.new_cache(2, 24), model.new_cache(2, 24)
        full = prefill(model, ids, whole, pad_mask, chunk, all_logits=True)
        got = prefill(model, ids, last, pad_mask, chunk)
        torch.testing.assert_close(got, full[:, -1:], atol=1e-5, rtol=1e-5)
        assert last.length == whole.length == 19
        for layer in range(model.config.n_layer):
            torch.testing.assert_close(last.k[layer][:, :, :19], whole.k[layer][:, :, :19], atol=1e-6, rtol=0)
            torch.testing.assert_close(last.v[layer][:, :, :19], whole.v[layer][:, :, :19], atol=1e-6, rtol=0)


def test_last_only_runs_the_last_block_after_attention_for_one_token(make_model):
    model = make_model("llama", n_layer=3)
    rows = {}

    def count(name):
        return lambda module, args: rows.__setitem__(name, args[0].shape[:-1].numel())

    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_pre_hook(count(f"qkv{i}"))
        block.attn.proj.register_forward_pre_hook(count(f"proj{i}"))
        block.mlp.down.register_forward_pre_hook(count(f"down{i}"))
    with torch.no_grad():
        model(random_ids(2, 16), last_only=True)
    # Every block projects every token's keys and values; the blocks before the last feed all of
    # them to the next; the last block's output projection and MLP see each row's last token only.
    assert rows == {"qkv0": 32, "proj0": 32, "down0": 32, "qkv1": 32, "proj1": 32, "down1": 32,
                    "qkv2": 32, "proj2": 2, "down2": 2}
