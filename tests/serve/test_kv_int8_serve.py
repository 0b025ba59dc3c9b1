"""`lmforge serve --kv-cache-dtype int8`: the engine's batch slots keep keys and values as int8
(infer.slots.Int8SlotCache): a quarter of the fp32 slots' bytes, the same perplexity within
0.5%, and the engine's batching, slot moves and prefix cache work on it as on fp32."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.chunked_prefill import prefill
from lmforge.infer.engine import Engine, Request
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.slots import Int8SlotCache, SlotCache
from lmforge.model import Transformer

TEXT = ["<html><body><nav>Home | About | Contact</nav><p>The queen's speech opened the session of parliament.</p>"
        "<footer>© 2024 Example News</footer></body></html>",
        "Transformer 模型的 attention 机制计算 query 和 key 的点积, 再用 softmax 归一化, 得到 value 的加权和。",
        '{"id": 17, "url": "https://example.org/a?b=1", "text": "ROMEO: But soft, what light through yonder window breaks?"}',
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows."]


@pytest.fixture(scope="module")
def web_tokenizer():
    return train_tokenizer(TEXT * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(web_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=96,
                      vocab_size=web_tokenizer.vocab_size)
    m = Transformer(cfg)
    m.reset_parameters(seed=0)
    return m.eval()


@torch.inference_mode()
def perplexity(model, ids: list[int], cache_type: type[SlotCache]) -> float:
    """exp(mean next-token loss) of `ids`, every key and value read back from a slot cache (slot 1 of 2)."""
    cache = cache_type.for_model(model, 2)
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    logits = prefill(model, x, cache, chunk=16, all_logits=True, bind=lambda start, t: cache.bind_prefill(1, t, start))
    return math.exp(F.cross_entropy(logits[0].float(), y).item())


def test_int8_slots_take_a_quarter_of_the_bytes_and_keep_the_perplexity(model, web_tokenizer):
    fp32, int8 = SlotCache.for_model(model, 8), Int8SlotCache.for_model(model, 8)
    d = model.config.dim_head
    assert int8.nbytes() / fp32.nbytes() == pytest.approx((d + 4) / (4 * d))  # int8 values and an fp32 scale per vector
    assert int8.nbytes() <= fp32.nbytes() / 2
    ids = web_tokenizer.encode(" ".join(TEXT))[:95]
    base, small = perplexity(model, ids, SlotCache), perplexity(model, ids, Int8SlotCache)
    assert abs(small / base - 1) <= 0.005, (base, small)
    assert small != base  # the values really went through int8


def test_the_engine_batches_moves_and_reuses_prefixes_on_int8_slots(model, web_tokenizer):
    prompts = [web_tokenizer.encode(t)[:40] for t in TEXT]
    params = [SamplingParams(max_new_tokens=6 + 5 * i) for i in range(len(prompts))]  # they leave at different steps
    with Engine(model, web_tokenizer, max_batch=4, kv_cache_dtype="int8", prefix_cache=PrefixCache(1 << 20)) as engine:
        assert isinstance(engine.cache, Int8SlotCache) and engine.native is None  # the native decoder reads fp32
        alone = [engine.generate([Request(p, sp)], timeout=60)[0].token_ids for p, sp in zip(prompts, params)]
        hits = engine.prefix_cache.stats.hit_tokens
        together = [r.token_ids for r in engine.generate([Request(p, sp) for p, sp in zip(prompts, params)],
                                                          timeout=60)]
        assert engine.prefix_cache.stats.hit_tokens - hits >= len(prompts) * BLOCK  # the second time from the cache
    assert together == alone
    with Engine(model, web_tokenizer, max_batch=4, native=False) as engine:
        fp32 = [r.token_ids for r in engine.generate([Request(p, sp) for p, sp in zip(prompts, params)], timeout=60)]
    same = sum(a == b for x, y in zip(fp32, alone) for a, b in zip(x, y))
    assert same >= 0.9 * sum(len(x) for x in fp32), (fp32, alone)


@pytest.mark.parametrize("flags,message", [
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    (["--tp", "2", "--kv-cache-dtype", "int8"], "--tp does not support --kv-cache-dtype yet"),
    (["--kv-cache-dtype", "int8", "--speculative", "ngram"], "without --kv-cache-dtype int8"),
])
def test_what_the_int8_cache_refuses_is_one_line(tiny_model_dir, monkeypatch, capsys, flags, message):
    from lmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["lmforge", "serve", str(tiny_model_dir), *flags])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "\n" not in err, err


def test_the_served_app_decodes_on_int8_slots(tiny_model_dir):
    from lmforge.serve.command import build_app, decode_path
    from lmforge.serve.settings import ServeSettings

    app = build_app(tiny_model_dir, ServeSettings(model_name="tiny", kv_cache_dtype="int8"))
    assert isinstance(app.state.engine.cache, Int8SlotCache)
    assert decode_path(app.state.engine) == "PyTorch (int8 KV cache: the native decoder reads fp32 caches)"
