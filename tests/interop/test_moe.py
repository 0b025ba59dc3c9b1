"""Mixture of experts (mixtral, qwen3_moe, qwen2_moe with its shared expert): routing equal to
transformers', both normalisations,
training with the load-balancing loss, LoRA, int8 (saved, reloaded, decoded natively) and GGUF
refusals. Import/export parity, GGUF, ONNX and the fp32 native decoder run for these families
in test_hf.py, test_gguf.py, test_onnx.py and tests/infer/test_native_decode.py."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (VOCAB, hf_logits, probe_ids, random_hf_model, save_hf_dir, transformers,
                         without_lmforge_keys)

import lmforge
from lmforge.compress.qlinear import QuantizedLinear
from lmforge.compress.quantize import quantize_model
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.native_decode import NativeDecoder, step_cache, why_not
from lmforge.interop.convert import export_model, import_model
from lmforge.interop.gguf_io import export_gguf
from lmforge.model import Transformer
from lmforge.model.moe import load_balancing_loss
from lmforge.model_dir import save_model_dir

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def router_logits(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's router logits (tokens, n_experts) for `ids`."""
    seen = []
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for b in model.blocks]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", MOE)
def test_router_logits_and_chosen_experts_equal_transformers(family, hf_dirs):
    hf_model, hf_dir = hf_dirs[family]
    m = lmforge.load(hf_dir)
    ids = probe_ids()
    with torch.no_grad():
        theirs = hf_model(ids, output_router_logits=True).router_logits
    ours = router_logits(m.model, ids)
    assert len(ours) == len(theirs) == 2
    for mine, hf in zip(ours, theirs):
        torch.testing.assert_close(mine, hf, atol=1e-6, rtol=0)
        k = m.config.experts_per_token
        assert torch.equal(mine.softmax(-1).topk(k).indices, hf.softmax(-1).topk(k).indices)
    used = torch.cat(ours).softmax(-1).topk(2).indices.unique()
    assert len(used) == m.config.n_experts  # the probe exercises every expert


def tiny_moe_hf(family: str, seed: int = 0, **extra):
    cls = {"mixtral": transformers.MixtralConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig}[family]
    sizes = {"mixtral": {"intermediate_size": 64},
             "qwen3_moe": {"intermediate_size": 64, "moe_intermediate_size": 32, "head_dim": 16},
             "qwen2_moe": {"intermediate_size": 64, "moe_intermediate_size": 32,
                           "shared_expert_intermediate_size": 48}}[family]
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.1, **sizes)
    return random_hf_model(cls(**{**fields, **extra}), seed)


@pytest.mark.parametrize(("family", "extra"), [
    ("qwen3_moe", {"norm_topk_prob": False, "num_experts": 6}),  # raw top-k probabilities, as released configs allow
    ("qwen3_moe", {"norm_topk_prob": True, "num_experts": 5, "num_experts_per_tok": 3}),
    ("mixtral", {"num_local_experts": 3, "sliding_window": 8}),
    ("qwen2_moe", {"norm_topk_prob": True, "num_experts": 6}),  # renormalized, unlike the released models
    ("qwen2_moe", {"norm_topk_prob": False, "num_experts": 5, "num_experts_per_tok": 3, "qkv_bias": False}),
])
def test_variants_match_transformers_both_ways(family, extra, tokenizer, tmp_path):
    hf_model = tiny_moe_hf(family, **extra)
    ids = probe_ids(30)
    expected = hf_logits(hf_model, ids)
    imported = import_model(save_hf_dir(hf_model, tokenizer, tmp_path / "hf"), tmp_path / "imported")
    m = lmforge.load(imported)
    assert m.config.moe_norm_topk == extra.get("norm_topk_prob", family == "mixtral")
    with torch.no_grad():
        assert (m.model(ids) - expected).abs().max() < 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(export_model(imported, "hf", tmp_path / "out"),
                                                             attn_implementation="eager").eval()
    assert (hf_logits(back, ids) - expected).abs().max() < 1e-4
    assert m.config.moe_shared_d_ff == (48 if family == "qwen2_moe" else None)
    assert m.config.has_qkv_bias == (family == "qwen2_moe" and extra.get("qkv_bias", True))
    if (family, m.config.moe_norm_topk) in (("qwen3_moe", False), ("qwen2_moe", True)):
        with pytest.raises(LmforgeError, match="renormalizes the chosen experts"):
            export_gguf(m, tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()


def test_dense_layers_and_bad_expert_counts_are_refused_in_one_line(tokenizer, tmp_path):
    hf_model = tiny_moe_hf("qwen3_moe", num_experts=4, mlp_only_layers=[1])
    folder = save_hf_dir(hf_model, tokenizer, tmp_path / "hf")
    with pytest.raises(LmforgeError, match="every layer must be a mixture of experts"):
        lmforge.load(folder)
    with pytest.raises(ValueError, match="experts_per_token must be in 1..n_experts"):
        ModelConfig(family="mixtral", n_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="n_experts > 0 goes with a mixture-of-experts family"):
        ModelConfig(family="llama", n_experts=4)
    with pytest.raises(ValueError, match="n_experts > 0 goes with"):
        ModelConfig(family="mixtral")


def test_load_balancing_loss_counts_imbalance():
    # balanced: every expert gets its share of picks and of probability -> top_k
    probs = torch.full((8, 4), 0.25)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, chosen, 4).item() == pytest.approx(2.0)
    # every token on experts 0 and 1 with most of the probability there -> more
    skewed = torch.tensor([[0.45, 0.45, 0.05, 0.05]] * 8)
    assert load_balancing_loss(skewed, torch.tensor([[0, 1]] * 8), 4).item() == pytest.approx(3.6)


def test_training_reaches_the_router_with_and_without_the_auxiliary_loss():
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))

    def router_grads(coef: float) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(family="mixtral", vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                        context=32, n_experts=4, router_aux_coef=coef)).train()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), ids[:, 1:].reshape(-1))
        loss.backward()
        return [b.mlp.router.weight.grad.clone() for b in model.blocks], loss.item()

    plain, loss_plain = router_grads(0.0)
    balanced, loss_balanced = router_grads(0.5)
    assert loss_plain == loss_balanced  # the auxiliary loss reaches the gradients, not the reported loss
    assert all(g.abs().sum() > 0 for g in plain)  # the chosen experts' weights carry the language-model gradient
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(plain, balanced))

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="qwen3_moe", vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    context=32, n_experts=4, router_aux_coef=0.01)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # a token's flops count only the experts it runs (2 of 4 here)
    cfg = model.config
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    attention = 2 * 2 * cfg.n_layer * cfg.context * cfg.n_head * cfg.dim_head
    assert model.flops_per_token(training=False) == 2 * (linears - cfg.n_layer * 2 * expert) + attention


@pytest.mark.parametrize("family", MOE)
def test_int8_experts_saved_reloaded_and_decoded_natively(family, hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs[family][1])
    ids = probe_ids()
    with torch.no_grad():
        reference = m.model(ids)
    q = quantize_model(copy.deepcopy(m.model), "int8")
    block = q.blocks[0].mlp
    assert all(isinstance(e.up, QuantizedLinear) and isinstance(e.down, QuantizedLinear) for e in block.experts)
    if block.shared is not None:  # qwen2_moe's shared expert and its gate are quantized too
        assert isinstance(block.shared.up, QuantizedLinear) and isinstance(block.shared_gate, QuantizedLinear)
    assert type(block.router) is torch.nn.Linear  # the router keeps its fp32 weights: it picks the experts
    with torch.no_grad():
        got = q(ids)
    assert ((got - reference).norm() / reference.norm()).item() < 0.02
    out = save_model_dir(q, m.tokenizer, tmp_path / "q8")
    back = lmforge.load(out)
    with torch.no_grad():
        assert torch.equal(back.model(ids), got)
    # the C decoder on int8 experts: near the Python path (its activations are int8 too)
    assert why_not(back.model) is None
    prompts = [probe_ids(5, 3)[r].tolist() for r in range(3)]
    x = torch.tensor(prompts)
    ref_cache, nat_cache = back.model.new_cache(3), back.model.new_cache(3)
    with torch.no_grad():
        back.model(x, ref_cache)
        back.model(x, nat_cache)
        decoder = NativeDecoder.for_cache(back.model, nat_cache)
        ref, nat = [], []
        for token in probe_ids(8, 1)[0].tolist():
            ref.append(back.model(torch.full((3, 1), token), ref_cache)[:, -1])
            nat.append(step_cache(decoder, nat_cache, [token] * 3))
    ref, nat = torch.stack(ref), torch.stack(nat)
    assert ((nat - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize(("family", "method"), [("mixtral", "int8"), ("qwen3_moe", "int4"), ("qwen3", "int4")])
def test_quantized_directory_loads_in_transformers_with_lmforges_logits(family, method, hf_dirs, tmp_path):
    from lmforge.compress.quantize import run_quantize

    result = run_quantize(hf_dirs[family][1], method, tmp_path / method, log=lambda *a: None)
    assert result["layout"] == "compressed-tensors"
    ours = lmforge.load(tmp_path / method)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / method).eval()
    ids = probe_ids()
    with torch.no_grad():
        assert (hf_logits(theirs, ids) - ours.model(ids)).abs().max() < 1e-4


DDP_WORKER = """
import json, sys
from lmforge.config import load_recipe
from lmforge.train.trainer import train
train(load_recipe(None, json.loads(sys.argv[1])), progress=False, log=lambda *a: None)
"""


@pytest.mark.slow
def test_two_process_ddp_trains_a_mixture_of_experts(tmp_path):
    """Experts no token of a step chose get no gradient: DDP must not wait for them."""
    import json
    import subprocess
    import sys

    overrides = {
        # 8 tokens a rank, each to 1 of 16 experts: most experts idle in every step
        "model": {"family": "mixtral", "n_experts": 16, "experts_per_token": 1, "n_layer": 2, "d_model": 32,
                  "n_head": 4, "n_kv_head": 2, "context": 8, "router_aux_coef": 0.01},
        "data": {"corpus": "synthetic", "dir": str(tmp_path / "data"), "tokenizer": {"vocab_size": 300}},
        "train": {"batch_size": 2, "max_steps": 4, "warmup": 1, "checkpoint_every": 100, "log_every": 1,
                  "parallel": "ddp", "dtype": "float32"},
        "eval": {"every": 100, "batches": 1},
        "run": {"name": "moe", "out": str(tmp_path / "runs")},
    }
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), json.dumps(overrides)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = lmforge.load(tmp_path / "runs" / "moe" / "model")
    assert trained.config.family == "mixtral" and trained.config.n_experts == 16


@pytest.mark.parametrize("family", [*MOE, "qwen3"])
def test_foreign_gguf_is_read_from_llama_cpp_keys(family, hf_dirs, tmp_path):
    m = lmforge.load(hf_dirs[family][1])
    foreign = without_lmforge_keys(export_gguf(m, tmp_path / "m.gguf", "f32"), tmp_path / "foreign.gguf")
    back = lmforge.load(import_model(foreign, tmp_path / "back"))
    for key in ("family", "n_experts", "experts_per_token", "expert_dim", "moe_norm_topk", "has_qk_norm", "dim_head"):
        assert getattr(back.config, key) == getattr(m.config, key), key
    ids = probe_ids()
    with torch.no_grad():
        assert (back.model(ids) - m.model(ids)).abs().max() < 1e-4
