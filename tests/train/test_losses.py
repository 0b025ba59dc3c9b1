"""Chunked cross-entropy (`train.loss_chunk`): the loss and every gradient equal the unchunked
ones, the full logits never exist at once, and training (pretraining; DDP, FSDP) with it ends
where training without it does; the native softmax cross-entropy equals PyTorch's. SFT with
it: tests/finetune/test_sft.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from lmforge.config import ModelConfig, load_recipe
from lmforge.data.sft import IGNORE
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train.losses import chunked_cross_entropy, language_model_loss
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train

VOCAB, B, T = 1000, 3, 40


def model_and_batch(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(family="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    context=64, tie_embeddings=tie))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, VOCAB, (B, T), generator=g)
    y = torch.randint(0, VOCAB, (B, T), generator=g)
    y[0, :5] = IGNORE  # masked targets, as SFT has them
    y[2, -3:] = IGNORE
    return model, x, y


def loss_and_grads(model, x, y, chunk: int):
    model.zero_grad(set_to_none=True)
    loss = language_model_loss(model, model.lm_head, x, y, chunk)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 32, B * T, 10_000])  # chunks that do and do not divide the 120 rows
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(tie, chunk):
    model, x, y = model_and_batch(tie)
    reference = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    loss, grads = loss_and_grads(model, x, y, 0)
    assert loss == pytest.approx(reference.item(), abs=1e-6)
    chunked_loss, chunked = loss_and_grads(model, x, y, chunk)
    assert chunked_loss == pytest.approx(loss, abs=1e-5)
    assert grads.keys() == chunked.keys() and len(grads) > 5
    for name in grads:
        assert grads[name].abs().max() > 0, name  # every parameter, lm_head and embeddings included, learns
        assert (grads[name] - chunked[name]).abs().max().item() < 1e-5, name


def largest_tensor_made(fn) -> int:
    """The most elements of any tensor a torch function returned while `fn` ran."""
    sizes = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor))
            return out

    with Record():
        fn()
    return max(sizes)


def test_the_full_logits_are_never_made():
    """Forward and backward of the chunked loss never make a tensor larger than one chunk's
    logits (nor the weight); the unchunked loss does (the check can see it)."""
    model, x, y = model_and_batch(tie=True)
    chunk, weight = 16, model.lm_head.weight
    hidden = model.hidden_states(x).flatten(0, 1).detach().requires_grad_()

    def chunked():
        chunked_cross_entropy(hidden, weight, y.flatten(), chunk).backward()

    def unchunked():
        F.cross_entropy(F.linear(hidden, weight), y.flatten(), ignore_index=IGNORE).backward()

    assert largest_tensor_made(unchunked) >= B * T * VOCAB
    assert largest_tensor_made(chunked) <= max(chunk * VOCAB, weight.numel())
    assert chunk * VOCAB < B * T * VOCAB // 4


@pytest.mark.parametrize("needs", ["hidden", "weight", "neither"])
def test_frozen_inputs_and_no_grad(needs):
    """A frozen lm_head (LoRA) gets no gradient and the hidden states still do; under no_grad
    (validation) the loss is the same number."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=needs == "hidden")
    weight = torch.randn(300, 16, generator=g, requires_grad=needs == "weight")
    y = torch.randint(0, 300, (50,), generator=g)
    reference = F.cross_entropy(F.linear(hidden, weight), y)
    loss = chunked_cross_entropy(hidden, weight, y, 7)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    with torch.no_grad():
        assert chunked_cross_entropy(hidden, weight, y, 7).item() == pytest.approx(reference.item(), rel=1e-6)
    if needs == "neither":
        assert not loss.requires_grad
        return
    leaf = hidden if needs == "hidden" else weight
    (expected,) = torch.autograd.grad(reference, leaf)
    (got,) = torch.autograd.grad(loss, leaf)
    assert expected.abs().max() > 1e-3 and (expected - got).abs().max().item() < 1e-5


def test_all_targets_ignored_is_nan_like_cross_entropy():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8)
    y = torch.full((4,), IGNORE)
    assert torch.isnan(chunked_cross_entropy(h, w, y, 2)) and torch.isnan(F.cross_entropy(F.linear(h, w), y))


def test_pretraining_with_loss_chunk_ends_where_it_would_without(tiny_recipe, monkeypatch):
    """Three runs end at the same weights: PyTorch's own cross-entropy over the full logits
    (the reference), the default on the CPU (the native loss, one chunk per micro-batch) and
    loss_chunk 24."""
    from lmforge.model import activations
    from lmforge.train import losses

    chunked_calls = []
    monkeypatch.setattr(losses, "chunked_cross_entropy",
                        lambda *a: chunked_calls.append(a[3]) or chunked_cross_entropy(*a))
    sections = {"train": {"max_steps": 5, "grad_accum": 2}}
    with monkeypatch.context() as pytorch_only:
        pytorch_only.setattr(losses, "_native_cross_entropy", lambda: None)
        pytorch_only.setattr(activations, "_native_applies", lambda x: False)
        plain = train(tiny_recipe("plain", **sections), progress=False, log=lambda s: None)
    assert chunked_calls == []
    whole = train(tiny_recipe("whole", **sections), progress=False, log=lambda s: None)
    assert chunked_calls == [128] * 10  # 5 steps of 2 micro-batches of 128 rows
    chunked_calls.clear()
    chunked = train(tiny_recipe("chunked", train={**sections["train"], "loss_chunk": 24}), progress=False,
                    log=lambda s: None)
    assert chunked_calls == [24] * 10  # 5 chunks of 24 and one of 8 each
    assert load_recipe(chunked.run_dir / "recipe.yaml").train.loss_chunk == 24
    reference = load_file(str(plain.model_dir / "model.safetensors"))
    for run in (whole, chunked):
        weights = load_file(str(run.model_dir / "model.safetensors"))
        assert max((reference[k] - weights[k]).abs().max().item() for k in reference) < 1e-5
        assert run.val.loss == pytest.approx(plain.val.loss, abs=1e-5)
    losses = [[r["loss"] for r in read_metrics(run.run_dir) if "loss" in r] for run in (plain, whole, chunked)]
    assert len(losses[0]) == 5 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0] == pytest.approx(losses[2], abs=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_softmax_cross_entropy_equals_pytorch(native, monkeypatch):
    """Per-row losses and the gradient written over the logits, against F.cross_entropy and
    autograd: a vocabulary that is not a multiple of the vector width, large logits, ignored
    rows; the C kernel and the PyTorch fallback alike."""
    from lmforge import native as kernels
    from lmforge.train import losses

    if native:
        assert kernels.elementwise() is not None  # the C kernel is what this case tests
    else:
        monkeypatch.setattr(losses, "_native_cross_entropy", lambda: None)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1003, generator=g) * 20
    targets = torch.randint(0, 1003, (37,), generator=g)
    targets[[0, 5, 36]] = IGNORE
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, targets, ignore_index=IGNORE, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)

    untouched = logits.clone()
    assert losses.softmax_cross_entropy_(untouched, targets, IGNORE, grad=False) == pytest.approx(
        expected.detach(), abs=2e-5)
    assert torch.equal(untouched, logits)  # without grad the logits stay
    got = losses.softmax_cross_entropy_(logits, targets, IGNORE, grad=True)
    assert got == pytest.approx(expected.detach(), abs=2e-5) and got[[0, 5, 36]].abs().max() == 0
    assert (logits - expected_grad).abs().max().item() < 1e-5  # exp(x - lse): lse ~ 60 rounds to ~4e-6
    assert logits[[0, 5, 36]].abs().max() == 0 and expected_grad.abs().max() > 0.5


def test_softmax_cross_entropy_reads_bf16_logits():
    """Under bf16 autocast lm_head's logits are bf16: the kernel takes them as they are, the
    loss in fp32 equals F.cross_entropy of their fp32 values, the gradient comes back in bf16."""
    from lmforge.train import losses

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(37, 1003, generator=g) * 5).bfloat16()
    targets = torch.randint(0, 1003, (37,), generator=g)
    targets[3] = IGNORE
    leaf = logits.float().requires_grad_()
    expected = F.cross_entropy(leaf, targets, ignore_index=IGNORE, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    got = losses.softmax_cross_entropy_(logits, targets, IGNORE, grad=True)
    assert got.dtype == torch.float32 and got == pytest.approx(expected.detach(), abs=2e-5)
    assert logits.dtype == torch.bfloat16 and (logits.float() - expected_grad).abs().max().item() < 4e-3
    assert logits[3].abs().max() == 0


def test_a_target_outside_the_vocabulary_is_an_error():
    from lmforge.train.losses import softmax_cross_entropy_

    with pytest.raises(ValueError, match="a target outside 0..9"):
        softmax_cross_entropy_(torch.randn(3, 10), torch.tensor([1, 10, 2]), IGNORE, grad=True)


def test_loss_chunk_is_validated():
    with pytest.raises(LmforgeError, match="loss_chunk must be >= 0"):
        load_recipe("tiny", ["--train.loss_chunk", "-1"])


WORKER = """
import json, sys
from lmforge.config import load_recipe
from lmforge.train.trainer import train
train(load_recipe(None, json.loads(sys.argv[1])), progress=False, log=lambda *a: None)
"""


@pytest.mark.slow
def test_ddp_and_fsdp_with_loss_chunk_equal_one_process_without(tmp_path):
    """Under DDP and FSDP2 the model's forward runs through the wrapper and lm_head is applied
    outside it, chunk by chunk; gradients must still be synchronized (and, under FSDP,
    the root's parameters gathered) exactly as without chunking."""

    def overrides(name, parallel="auto", chunk=0):
        return {"model": {"n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32},
                "data": {"corpus": "synthetic", "dir": str(tmp_path / "data"), "tokenizer": {"vocab_size": 300}},
                "train": {"batch_size": 4, "max_steps": 6, "warmup": 2, "checkpoint_every": 100, "log_every": 1,
                          "parallel": parallel, "loss_chunk": chunk, "dtype": "float32"},
                "eval": {"every": 100, "batches": 1}, "run": {"name": name, "out": str(tmp_path / "runs")}}

    train(load_recipe(None, overrides("single")), progress=False, log=lambda s: None)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    reference = load_file(str(tmp_path / "runs" / "single" / "model" / "model.safetensors"))
    for parallel in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(overrides(parallel, parallel, 24))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = load_file(str(tmp_path / "runs" / parallel / "model" / "model.safetensors"))
        assert max((reference[k] - got[k]).abs().max().item() for k in reference) < 1e-5, parallel
