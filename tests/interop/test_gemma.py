"""The Gemma family (gemma, gemma2, gemma3 text) beyond the shared parity tests in test_hf.py:
settings the shared tiny models keep at llama.cpp's fixed values (query_pre_attn_scalar, the
sliding-layer pattern, gemma3's local rope base), legacy config.json keys, KV-cache decoding
against the full forward pass and against transformers' own generate, left-padded batches
across the sliding window, GGUF refusals, and config errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import VOCAB, hf_logits, probe_ids, save_hf_dir, transformers

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.convert import export_model, import_model
from lmforge.interop.gguf_io import export_gguf

GEMMA = ("gemma", "gemma2", "gemma3")
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, sliding_window=4)
# What llama.cpp cannot express: a query scale of 1/sqrt(24) with head_dim 16, a first layer of
# full attention, gemma3 with soft-capping and a sliding-layer rope base of 100.
CUSTOM = {
    "gemma2": lambda: transformers.Gemma2Config(
        **SHAPE, num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
        final_logit_softcapping=2.5, layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SHAPE, num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,  # ignored by gemma3
        final_logit_softcapping=4.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=10000.0, rope_local_base_freq=100.0, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def custom_dirs(tmp_path_factory, tokenizer):
    out = {}
    for family, make in CUSTOM.items():
        torch.manual_seed(3)
        model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.1)
        out[family] = (model, save_hf_dir(model, tokenizer, tmp_path_factory.mktemp(f"custom-{family}")))
    return out


@pytest.mark.parametrize("family", list(CUSTOM))
def test_settings_llama_cpp_fixes_still_match_transformers_both_ways(family, custom_dirs, tmp_path):
    hf_model, hf_dir = custom_dirs[family]
    ids = probe_ids()
    expected = hf_logits(hf_model, ids)
    ours = lmforge.load(import_model(hf_dir, tmp_path / "imported"))
    cfg = ours.config
    assert cfg.query_pre_attn_scalar == 24 and cfg.layer_types == hf_model.config.layer_types
    with torch.no_grad():
        assert (ours.model(ids) - expected).abs().max() < 1e-4
        # the capped logits really are capped, and the cap is what made them so
        assert ours.model(ids).abs().max() < cfg.logit_softcap
    back = transformers.AutoModelForCausalLM.from_pretrained(export_model(ours.path, "hf", tmp_path / "hf"),
                                                             attn_implementation="eager").eval()
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4
    assert back.config.layer_types == hf_model.config.layer_types
    with pytest.raises(LmforgeError, match="would not run the same in llama.cpp"):
        export_gguf(ours, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_legacy_gemma3_config_keys(custom_dirs, tmp_path):
    """Configs on the Hub written before transformers 5: rope_theta/rope_local_base_freq and a
    sliding_window_pattern instead of rope_parameters and layer_types."""
    hf_model, hf_dir = custom_dirs["gemma3"]
    folder = shutil.copytree(hf_dir, tmp_path / "legacy")
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        config.pop(key)
    config.update(rope_theta=10000.0, rope_local_base_freq=100.0, sliding_window_pattern=2)  # S F S
    (folder / "config.json").write_text(json.dumps(config))
    ours = lmforge.load(folder)
    assert ours.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert ours.config.rope_local_theta == 100.0
    ids = probe_ids()
    with torch.no_grad():
        assert (ours.model(ids) - hf_logits(hf_model, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("family", GEMMA)
def test_kv_cache_steps_equal_the_full_forward_and_greedy_equals_transformers(family, hf_dirs):
    hf_model, hf_dir = hf_dirs[family]
    ours = lmforge.load(hf_dir)
    ids = probe_ids(20, 1)
    with torch.no_grad():
        full = ours.model(ids)
        cache = ours.model.new_cache(1)
        steps = [ours.model(ids[:, :5], cache)]  # a prompt, then one token at a time past the window of 4
        steps += [ours.model(ids[:, t:t + 1], cache) for t in range(5, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    prompt = probe_ids(6, 1)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, 6:].tolist()
    (completion,) = ours.complete([prompt[0].tolist()], max_new_tokens=12, temperature=0.0, native=False)
    assert len(completion.token_ids) >= 3  # greedy may stop early at our end-of-text token
    assert completion.token_ids == theirs[:len(completion.token_ids)]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_left_padded_batch_decodes_like_each_prompt_alone(family, hf_dirs):
    model = lmforge.load(hf_dirs[family][1]).model
    prompts = [probe_ids(9, 1)[0].tolist(), probe_ids(3, 1)[0].tolist()]
    x = torch.tensor([prompts[0], [0] * 6 + prompts[1]])
    pad = torch.tensor([[True] * 9, [False] * 6 + [True] * 3])
    feed = [5, 17, 230, 41, 8, 99]
    with torch.no_grad():
        cache = model.new_cache(2)
        batch = [model(x, cache, pad_mask=pad, last_only=True)[:, -1]]
        batch += [model(torch.tensor([[t], [t]]), cache, last_only=True)[:, -1] for t in feed]
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p + feed]))[0, len(p) - 1:]
            assert (torch.stack(batch)[:, row] - alone).abs().max() < 1e-4


def test_gemma_config_errors(hf_dirs, tmp_path):
    folder = shutil.copytree(hf_dirs["gemma2"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    cases = [({"model_type": "gemma3"}, "multimodal Gemma3ForConditionalGeneration"),
             ({"hidden_activation": "relu"}, "activation 'relu' is not supported"),
             ({"layer_types": ["full_attention"]}, "layer_types must list"),
             ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
             ({"attention_bias": True}, "attention_bias")]
    for change, message in cases:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LmforgeError, match=message):
            lmforge.load(folder)


def test_norm_weights_are_stored_as_transformers_stores_them(hf_dirs, tmp_path):
    """Ours hold 1 + w; the exported files hold w again (bit for bit in fp32 for these values)."""
    from safetensors.torch import load_file

    hf_model, hf_dir = hf_dirs["gemma3"]
    ours = lmforge.load(hf_dir)
    theirs = hf_model.state_dict()
    assert torch.equal(ours.model.blocks[0].attn.q_norm.weight, theirs["model.layers.0.self_attn.q_norm.weight"] + 1)
    saved = load_file(str(export_model(hf_dir, "hf", tmp_path / "out") / "model.safetensors"))
    for name in ("model.norm.weight", "model.layers.5.post_feedforward_layernorm.weight"):
        assert (saved[name] - theirs[name]).abs().max() < 1e-7


def test_training_loss_sees_the_soft_capped_logits(hf_dirs):
    """gemma2's loss is the cross-entropy of the capped logits, also where the loss would
    otherwise apply lm_head itself (the fused/chunked path), and its gradient flows."""
    import torch.nn.functional as F

    from lmforge.train.losses import language_model_loss

    model = lmforge.load(hf_dirs["gemma2"][1]).model.train()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits well past the cap of 3, so capping them matters
    ids, targets = probe_ids(16, 2), probe_ids(16, 2).roll(-1, dims=1)
    expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    uncapped = F.cross_entropy(model.lm_head(model(ids, return_hidden=True)).flatten(0, 1), targets.flatten())
    assert abs(uncapped.item() - expected.item()) > 0.1
    for chunk in (0, 8):
        loss = language_model_loss(model, model.lm_head, ids, targets, chunk)
        assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    assert model.blocks[0].post_attn_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method,tolerance", [("int8", 0.03), ("int4", 0.3)])
def test_quantized_gemma_stays_close_and_loads(method, tolerance, hf_dirs, tmp_path):
    from lmforge.compress.quantize import run_quantize

    hf_model, hf_dir = hf_dirs["gemma2"]
    base = lmforge.load(import_model(hf_dir, tmp_path / "base"))
    run_quantize(base.path, method, tmp_path / method, group_size=32, log=lambda s: None)
    quantized = lmforge.load(tmp_path / method)
    ids = probe_ids()
    with torch.no_grad():
        reference = base.model(ids)
        ours = quantized.model(ids)
        assert 0 < (ours - reference).abs().max() < tolerance
        # transformers reads the same file (compressed-tensors) with the same weights: norms saved as w, not 1 + w
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / method).eval()(ids).logits.float()
        assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()
    (completion,) = quantized.complete([ids[0, :6].tolist()], max_new_tokens=6, temperature=0.0)
    assert len(completion.token_ids) >= 1


def test_block_by_block_replay_is_the_forward_pass(hf_dirs):
    """GPTQ calibrates one block at a time: each block must get the scaled embeddings, its own
    rope table and its own window, as in the forward pass."""
    from lmforge.compress.calibration import blocks_with_inputs

    model = lmforge.load(hf_dirs["gemma3"][1]).model
    tokens = probe_ids(24, 2)
    *_, (layer, final) = blocks_with_inputs(model, tokens)
    with torch.no_grad():
        expected = model(tokens, return_hidden=True)
    assert layer == 6 and (final[0] - expected).abs().max() < 1e-5


def test_gemma3_linear_rope_scaling_on_global_layers_matches_transformers_both_ways(tokenizer, tmp_path):
    """Gemma 3 4B and larger scale RoPE linearly (factor 8) on their full-attention layers only."""
    def make(scaling):
        config = transformers.Gemma3TextConfig(**SHAPE, num_hidden_layers=2, rope_scaling=scaling,
                                               layer_types=["sliding_attention", "full_attention"])
        torch.manual_seed(4)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.1)
        return model

    hf_model = make({"rope_type": "linear", "factor": 8.0})
    ids = probe_ids()
    expected = hf_logits(hf_model, ids)
    assert (hf_logits(make(None), ids) - expected).abs().max() > 1e-2  # the scaling changes the output
    ours = lmforge.load(import_model(save_hf_dir(hf_model, tokenizer, tmp_path / "hf"), tmp_path / "imported"))
    assert ours.config.rope_scaling.rope_type == "linear" and ours.config.rope_scaling.factor == 8.0
    with torch.no_grad():
        assert (ours.model(ids) - expected).abs().max() < 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(export_model(ours.path, "hf", tmp_path / "out"),
                                                             attn_implementation="eager").eval()
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4
    with pytest.raises(LmforgeError, match="would not run the same in llama.cpp"):
        export_gguf(ours, tmp_path / "m.gguf")
