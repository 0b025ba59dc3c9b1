"""The native batch-1 decoder (lmforge/native/decode.c) against the PyTorch reference path:
every family, odd shapes, long prompts, the cache at the context limit, quantized layers
within the quantizer's error, the engine and the CLI's switch, and the fallbacks."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch

from lmforge import native
from lmforge.compress.quantize import quantize_model
from lmforge.config import Family
from lmforge.infer.engine import Engine, Request
from lmforge.infer.generate import generate_ids
from lmforge.infer.native_decode import NativeDecoder, step_cache, why_not
from lmforge.infer.sampling import SamplingParams
from lmforge.native import decode_abi as abi

# Gemma: untied embeddings (a tied, untrained Gemma's scaled embedding dominates the residual,
# so it predicts the token it was fed, forever); gemma2/3 with every setting of theirs on.
GEMMA_LAYERS = dict(tie_embeddings=False, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                    logit_softcap=10.0, query_pre_attn_scalar=24)
EXTRA = {"mistral": {"sliding_window": 6}, "phi3": {"sliding_window": 6}, "mixtral": {"sliding_window": 6},
         "gemma": {"tie_embeddings": False},
         "gemma2": {**GEMMA_LAYERS, "attn_softcap": 5.0}, "gemma3": {**GEMMA_LAYERS, "rope_local_theta": 100.0}}
FAMILY_CASES = [(f, EXTRA.get(f, {})) for f in get_args(Family)]
FAMILY_IDS = [f + ("-window6" if "sliding_window" in extra else "") for f, extra in FAMILY_CASES]


def prompt(length: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, ids: list[int], n: int, native: bool) -> list[int]:
    out, _ = generate_ids(model, [ids], SamplingParams(max_new_tokens=n), eos_id=None, native=native)
    return out[0]


@torch.inference_mode()
def stepwise_logits(model, ids: list[int] | list[list[int]], feed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (steps, batch, vocab) for feeding `feed` one token at a time (the same token to
    every row) after the prompt(s) `ids`, left-padded: (reference path, native path), each
    from its own cache."""
    prompts = ids if isinstance(ids[0], list) else [ids]
    longest = max(len(p) for p in prompts)
    x = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    pad = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
    pad = None if bool(pad.all()) else pad
    ref_cache, nat_cache = model.new_cache(len(prompts)), model.new_cache(len(prompts))
    model(x, ref_cache, pad_mask=pad, last_only=True)
    model(x, nat_cache, pad_mask=pad, last_only=True)
    decoder = NativeDecoder.for_cache(model, nat_cache)
    assert decoder is not None, why_not(model)
    ref, got = [], []
    for token in feed:
        ref.append(model(torch.full((len(prompts), 1), token), ref_cache, last_only=True)[:, -1])
        got.append(step_cache(decoder, nat_cache, [token] * len(prompts)))
    return torch.stack(ref), torch.stack(got)


# Odd shapes: vocabulary 331 and d_model 72 (head_dim 18) divide by none of 8/32/128, so
# every fp32 kernel runs its remainder loops; ffn 100 likewise.
@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_fp32_native_path_gives_the_reference_logits_and_greedy_tokens(make_model, family, extra):
    model = make_model(family, vocab_size=331, d_model=72, d_ff=100, context=48, init_std=0.3, **extra)
    ids = prompt(5, 331)
    ref, got = stepwise_logits(model, ids, prompt(30, 331, seed=2))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    tokens = greedy(model, ids, 40, native=True)
    assert tokens == greedy(model, ids, 40, native=False)
    assert len(set(tokens)) >= 5  # a real sequence, not one token repeated


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES, ids=FAMILY_IDS)
def test_a_batch_of_six_runs_the_tiled_kernel_and_gives_the_reference_logits(make_model, family, extra):
    # From 4 rows on, fp32 matmuls take tiles of weight rows against four activation rows
    # (with AVX-512 four weight rows, and 6 activation rows are a tile of four and one of
    # two; with AVX2 two weight rows, and 6 are a tile of four and two rows alone). The odd
    # vocabulary (331) leaves weight rows outside any tile; d_model 72 and ffn 100 leave
    # remainders along K; head_dim 18 one in the attention's dot products.
    model = make_model(family, vocab_size=331, d_model=72, d_ff=100, context=48, init_std=0.3, **extra)
    prompts = [prompt(n, 331, seed=10 + n) for n in (3, 7, 5, 9, 2, 6)]
    ref, got = stepwise_logits(model, prompts, prompt(15, 331, seed=2))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_batch_through_matmuls_whose_rows_do_not_fill_the_last_chunk(make_model, family):
    # Matmul rows are shared out in chunks of 32 and multiplied four at a time: d_model 66
    # (3 heads of 22) leaves two rows past the last four, in a chunk of their own, for the
    # projections that add into the residual stream; vocabulary 33 does the same for lm_head.
    model = make_model(family, vocab_size=33, d_model=66, n_head=3, n_kv_head=None if family == "gpt2" else 1,
                       d_ff=70, context=48, init_std=0.3)
    prompts = [prompt(n, 33, seed=30 + n) for n in (3, 7, 5, 9, 2)]
    ref, got = stepwise_logits(model, prompts, prompt(10, 33, seed=4))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_batch_through_a_matmul_wider_than_one_column_block(make_model, family):
    # With AVX-512 the batched matmul takes 512 columns per pass and adds the passes up: an
    # ffn of 600 makes the down projection two passes, the second of 88 columns (5 vectors
    # and a masked remainder), with the residual already in the output and, for gpt2, a bias.
    model = make_model(family, vocab_size=331, d_model=72, d_ff=600, context=48, init_std=0.1)
    prompts = [prompt(n, 331, seed=20 + n) for n in (3, 7, 5, 9, 2)]
    ref, got = stepwise_logits(model, prompts, prompt(10, 331, seed=3))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_a_prompt_fed_beside_another_sequence_in_one_step_gets_its_own_causal_logits(make_model):
    # The engine feeds a new prompt's tokens as rows of the running batch's step, all into
    # one cache row: each must see only the tokens before it (and the sliding window).
    from lmforge.infer.slots import SlotCache

    model = make_model("mistral", vocab_size=331, d_model=72, d_ff=100, context=48, init_std=0.3, sliding_window=6)
    cache = SlotCache.for_model(model, 2)
    decoder = NativeDecoder.create(model, cache.k, cache.v)
    a, b = prompt(9, 331, seed=1), prompt(4, 331, seed=2)
    decoder.step(b[:3], [0, 1, 2], cache_rows=[1, 1, 1])
    logits = decoder.step(a + b[3:], list(range(9)) + [3], cache_rows=[0] * 9 + [1])
    torch.testing.assert_close(logits[:9], model(torch.tensor([a]))[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[9], model(torch.tensor([b]))[0, -1], atol=1e-4, rtol=0)
    # The same step again (it rewrites the same keys and values), asking only for the rows
    # that have a next token to choose: the prompt's last and the other sequence's.
    last_rows = decoder.step(a + b[3:], list(range(9)) + [3], cache_rows=[0] * 9 + [1], logits_rows=[8, 9])
    torch.testing.assert_close(last_rows, logits[[8, 9]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cache row outside"):
        decoder.step([1], [0], cache_rows=[2])
    with pytest.raises(ValueError, match="logits_rows"):
        decoder.step([1, 2], [0, 1], cache_rows=[0, 0], logits_rows=[1, 0])


def test_long_prompt_and_the_cache_filled_to_the_context_limit(make_model):
    model = make_model("mistral", context=256, init_std=0.1, sliding_window=40)
    ids = prompt(200, 320)
    tokens = greedy(model, ids, 100, native=True)  # stops at the context: 56 new tokens
    assert len(tokens) == 56
    assert tokens == greedy(model, ids, 100, native=False)


def test_a_step_past_the_cache_capacity_is_refused(make_model):
    model = make_model("llama")
    cache = model.new_cache(1, capacity=4)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache)
        decoder = NativeDecoder.for_cache(model, cache)
        step_cache(decoder, cache, [5])
        with pytest.raises(ValueError, match="KV cache full"):
            step_cache(decoder, cache, [6])


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_native_path_matches_the_dequantized_model_within_the_quantizer_error(make_model, family, method):
    base = make_model(family, vocab_size=333, d_model=64, context=48, init_std=0.1)
    model = quantize_model(copy.deepcopy(base), method, 32, log=lambda *a: None)
    # The reference: the same quantized weights, dequantized into a plain fp32 model.
    dequantized = copy.deepcopy(base)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            dequantized.get_submodule(name).weight.data.copy_(module.dequantize())
    ids, feed = prompt(6, 333), prompt(20, 333, seed=3)
    ref, got = stepwise_logits(model, ids, feed)
    exact, _ = stepwise_logits(dequantized, ids, feed)
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # Activations are quantized to int8 per block of 32 on the fly: ~1% of the logits' size,
    # no worse than the reference path (which for w8a8 is fbgemm's per-tensor activation scale).
    assert rel(got, exact) < 0.03
    assert rel(got, exact) <= max(1.5 * rel(ref, exact), 0.01)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_a_batch_of_left_padded_prompts_decodes_like_each_prompt_alone(make_model, family):
    extra = {"sliding_window": 6} if family == "mistral" else {}
    model = make_model(family, vocab_size=331, d_model=64, context=48, init_std=0.3, **extra)
    prompts = [prompt(3, 331, seed=4), prompt(9, 331, seed=5), prompt(6, 331, seed=6)]
    out, _ = generate_ids(model, prompts, SamplingParams(max_new_tokens=20), eos_id=None, native=True)
    ref, _ = generate_ids(model, prompts, SamplingParams(max_new_tokens=20), eos_id=None, native=False)
    assert out == ref == [greedy(model, p, 20, native=True) for p in prompts]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_batch_steps_like_the_reference_batch(make_model, method):
    model = quantize_model(make_model("llama", vocab_size=331, d_model=64, context=48, init_std=0.3), method, 32,
                           log=lambda *a: None)
    prompts = [prompt(3, 331, seed=4), prompt(9, 331, seed=5), prompt(6, 331, seed=6)]
    ref, got = stepwise_logits(model, prompts, prompt(12, 331, seed=7))
    # Both quantize each row's activations in blocks of 32; only the summation order differs.
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize(("method", "group", "d_model", "d_ff"),
                         [("int8", 32, 96, 160), ("int4", 32, 96, 160), ("int4", 64, 128, 192)])
def test_a_quantized_batch_of_six_is_within_the_quantizer_error(make_model, method, group, d_model, d_ff):
    # Six rows: with AVX-512 VNNI, low-bit weights take four rows against a tile of four
    # sequences and one of two, two blocks of 32 at a time; d_model 96 and ffn 160 are odd
    # numbers of blocks (3 and 5), int4 groups of 32 put a block pair in two groups, groups
    # of 64 in one; vocabulary 331 leaves three rows outside any tile. Quantizing activations
    # is discontinuous, so two paths that sum in different orders can round an activation
    # differently: both are held to the dequantized model instead.
    assert_batch_of_six_within_quantizer_error(make_model, method, group, d_model, d_ff)


def assert_batch_of_six_within_quantizer_error(make_model, method: str, group: int, d_model: int, d_ff: int):
    base = make_model("llama", vocab_size=331, d_model=d_model, d_ff=d_ff, context=48, init_std=0.1)
    model = quantize_model(copy.deepcopy(base), method, group, log=lambda *a: None)
    dequantized = copy.deepcopy(base)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            dequantized.get_submodule(name).weight.data.copy_(module.dequantize())
    prompts = [prompt(n, 331, seed=4 + n) for n in (3, 9, 6, 2, 7, 4)]
    with pytest.MonkeyPatch.context() as patch:  # the integer kernels (not fp32 copies) for the batch of six
        patch.setattr("lmforge.infer.native_decode.DEQUANTIZE_MAX_MIB", {})
        ref, got = stepwise_logits(model, prompts, prompt(12, 331, seed=7))
    exact, _ = stepwise_logits(dequantized, prompts, prompt(12, 331, seed=7))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(got, exact) < 0.03
    assert rel(got, exact) <= max(1.5 * rel(ref, exact), 0.01)


def test_lora_models_and_encoders_stay_on_the_reference_path(make_model):
    from lmforge.adapters import apply_lora
    from lmforge.model.lora import LoraSettings

    model = make_model("llama")
    assert why_not(model) is None
    lora = apply_lora(copy.deepcopy(model), LoraSettings(r=4))
    assert "LoraLinear layers are not covered" in why_not(lora)
    assert greedy(lora, [1, 2, 3], 5, native=True) == greedy(lora, [1, 2, 3], 5, native=False)
    assert "encoder" in why_not(make_model("llama", causal=False))
    bf16 = make_model("llama").to(torch.bfloat16)
    assert "bfloat16" in why_not(bf16)


def test_without_native_kernels_generation_falls_back(make_model, monkeypatch):
    model = make_model("llama", init_std=0.1)
    expected = greedy(model, [1, 2, 3], 8, native=False)
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert "not available" in why_not(model)
        assert greedy(model, [1, 2, 3], 8, native=True) == expected
    finally:
        monkeypatch.delenv("LMFORGE_NATIVE")
        native.kernels.cache_clear()


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "qwen3_moe"])
def test_engine_batches_native_equal_reference(make_model, tokenizer, family):
    model = make_model(family, vocab_size=tokenizer.vocab_size, context=64, init_std=0.3)
    requests = [Request(prompt=prompt(n, tokenizer.vocab_size, seed=n), params=SamplingParams(max_new_tokens=m))
                for n, m in ((4, 20), (9, 7), (2, 30), (6, 12))]  # they join and leave at different steps
    results = {}
    for use_native in (True, False):
        with Engine(model, tokenizer, max_batch=3, native=use_native) as engine:
            assert (engine.native is not None) == use_native
            results[use_native] = [r.token_ids for r in engine.generate(requests, timeout=60)]
    assert results[True] == results[False]
    alone = [greedy(model, r.prompt, r.params.max_new_tokens, native=False) for r in requests]
    assert [ids == a[:len(ids)] for ids, a in zip(results[True], alone)] == [True] * 4


def test_cli_generate_reference_path_flag(tiny_model_dir):
    from typer.testing import CliRunner

    from lmforge.cli import app

    runner = CliRunner()
    args = ["generate", str(tiny_model_dir), "-p", "hello", "--max-tokens", "12", "--no-stream"]
    fast = runner.invoke(app, args)
    ref = runner.invoke(app, args + ["--reference-path"])
    assert fast.exit_code == 0 and ref.exit_code == 0, fast.output + ref.output
    assert fast.output == ref.output


def cpu_flags() -> set[str]:
    lines = [line for line in open("/proc/cpuinfo") if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def test_the_native_build_decodes_with_the_widest_instruction_set_the_cpu_has():
    flags = cpu_flags()
    expected = ("avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags else "avx512" if "avx512f" in flags
                else "avx2" if "avx2" in flags else "none")
    assert abi.isa(native.load(native.build("native"))) == expected


# The narrower variants, built for an older CPU (-march) and run here in place of the native
# build: decode_avx2.h's tiles (haswell), and decode_avx512.h without VNNI, where int8/int4
# keep the row kernels (skylake-avx512).
VARIANTS = [("haswell", "avx2", "avx2"), ("skylake-avx512", "avx512", "avx512f")]


@pytest.fixture(params=VARIANTS, ids=[arch for arch, *_ in VARIANTS])
def variant(request, monkeypatch) -> str:
    """Decoding (and the quantized layers) on the kernels built for another -march."""
    arch, isa, flag = request.param
    if flag not in cpu_flags():
        pytest.skip(f"this CPU cannot run code built for {arch} (no {flag})")
    path = native.build(arch)
    assert path is not None, f"the kernels did not build for -march={arch}"
    lib = native.load(path)
    assert abi.isa(lib) == isa and abi.layout_mismatches(lib) == []
    monkeypatch.setattr(native, "kernels", lambda: lib)
    return arch


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_instruction_set_variant_gives_the_reference_logits(make_model, family, variant):
    model = make_model(family, vocab_size=331, d_model=72, d_ff=600, context=48, init_std=0.1)
    ids = prompt(5, 331)
    ref, got = stepwise_logits(model, ids, prompt(10, 331, seed=2))  # batch 1: the row kernels
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    prompts = [prompt(n, 331, seed=10 + n) for n in (3, 7, 5, 9, 2, 6)]
    ref, got = stepwise_logits(model, prompts, prompt(10, 331, seed=2))  # batch 6: the tiles and their remainders
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("method", "group"), [("int8", 32), ("int4", 64)])
def test_each_instruction_set_variant_decodes_a_quantized_batch_within_the_quantizer_error(make_model, method,
                                                                                             group, variant):
    assert_batch_of_six_within_quantizer_error(make_model, method, group, 128, 192)
