"""Training through oneDNN's matmuls (native/onednn.py): the forward and every gradient equal
`F.linear`'s to fp32 rounding; a tiny model trains to the same losses and weights with the
switch (LMFORGE_ONEDNN) on and off, tied embeddings and a LoRA fine-tune included; decode-size
calls, autocast, tracing, compiling and DTensors keep `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.model import fused
from lmforge.model.lora import LoraSettings
from lmforge.adapters import apply_lora
from lmforge.native import onednn
from lmforge.train.losses import language_model_loss
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train


@pytest.fixture
def calls(monkeypatch):
    """The number of oneDNN matmuls run since the test began (a list holding one count)."""
    assert onednn.AVAILABLE, "this torch build has no oneDNN linear"
    monkeypatch.delenv(onednn.SWITCH, raising=False)
    count = [0]
    real = onednn._mm

    def counting(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(onednn, "_mm", counting)
    return count


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Each instruction set's choices (the row threshold, whose weight gradient), whatever this CPU runs."""
    monkeypatch.setattr(onednn, "_avx512", lambda: request.param == "avx512")
    return request.param


def per_linear() -> int:
    """oneDNN calls of one linear's forward and backward: its weight gradient is MKL's on AVX2."""
    return 3 if onednn._avx512() else 2


def gradients(x, weight, bias, linear):
    """The output and the gradients of x, weight and bias (None where not asked) of a seeded
    random upstream gradient through `linear`."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
    y = linear(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


SHAPES = [  # (input shape, out features, bias, weight trained)
    ((37, 13), 29, True, True),
    ((2, 33, 65), 1001, False, True),  # 3-D input, output wider than input: the transposed weight gradient
    ((3, 40, 300), 20, True, True),  # output narrower than input
    ((5, 7, 9), 11, True, False),  # frozen weight (a base under LoRA)
    ((32, 384), 1152, True, True),  # as many rows as min_rows() asks on AVX2
]


@pytest.mark.parametrize("shape,out,bias,trained", SHAPES)
def test_forward_and_gradients_equal_f_linear(calls, isa, shape, out, bias, trained):
    g = torch.Generator().manual_seed(out)
    x = torch.randn(shape, generator=g, requires_grad=True)
    weight = (torch.randn(out, shape[-1], generator=g) / shape[-1] ** 0.5).requires_grad_(trained)
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    ours = gradients(x, weight, b, onednn.linear)
    assert calls[0] == per_linear() - (not trained and isa == "avx512")
    reference = gradients(x, weight, b, F.linear)
    assert (ours[2] is None) == (not trained)
    for got, want in zip(ours, reference):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_strided_input_and_an_upstream_gradient_that_is_not_contiguous(calls):
    x = torch.randn(50, 3, 24).transpose(0, 1).requires_grad_()  # (3, 50, 24), not contiguous
    weight = torch.randn(60, 24, requires_grad=True)
    y = onednn.linear(x, weight)
    upstream = torch.randn(60, 50, 3).permute(2, 1, 0)  # (3, 50, 60), not contiguous
    y.backward(upstream)
    y_ref = F.linear(x, weight)
    dx, dw = torch.autograd.grad(y_ref, (x, weight), upstream)
    assert calls[0] == per_linear()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, dw, atol=1e-5, rtol=1e-5)


def test_decode_size_calls_keep_f_linear(calls):
    layer = torch.nn.Linear(768, 768)
    for rows in (1, onednn.min_rows() - 1):
        x = torch.randn(1, rows, 768)
        with torch.inference_mode():
            torch.testing.assert_close(fused.linear(layer, x), layer(x), atol=0, rtol=0)
        fused.linear(layer, x).sum().backward()
    assert calls[0] == 0
    with torch.inference_mode():
        fused.linear(layer, torch.randn(1, onednn.min_rows(), 768))
    assert calls[0] == 1


def test_one_row_through_a_large_weight_takes_onednn(calls):
    """A weight read from memory (a last token's output layer) streams faster through oneDNN."""
    layer = torch.nn.Linear(2048, onednn.ONE_ROW_MIN_WEIGHT // 2048, bias=False)
    x = torch.randn(1, 1, 2048)
    with torch.inference_mode():
        torch.testing.assert_close(fused.linear(layer, x), layer(x), atol=1e-4, rtol=1e-5)
    assert calls[0] == 1


def test_the_row_threshold_follows_the_instruction_set(monkeypatch):
    """Measured crossovers: ~4 rows against MKL's AVX-512 code, ~32 against its AVX2 code."""
    for capability, rows in (("AVX512", 4), ("AVX2", 32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        onednn._avx512.cache_clear()
        assert onednn.min_rows() == rows
    monkeypatch.undo()
    onednn._avx512.cache_clear()


def test_the_switch_turns_every_onednn_matmul_off(calls, monkeypatch):
    x, weight = torch.randn(64, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    monkeypatch.setenv(onednn.SWITCH, "0")
    onednn.linear(x, weight).sum().backward()
    with torch.no_grad():
        onednn.linear(x, weight)
        onednn.matmul(x, weight)
    onednn.grad_input(torch.randn(64, 48), weight.detach())
    onednn.grad_weight(torch.randn(64, 48), x.detach())
    assert calls[0] == 0
    monkeypatch.setenv(onednn.SWITCH, "1")
    onednn.linear(x, weight).sum().backward()
    assert calls[0] == per_linear()


def test_autocast_keeps_f_linear_in_bf16(calls, isa):
    x, weight = torch.randn(64, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = onednn.linear(x, weight)
        with torch.no_grad():
            assert onednn.matmul(x, weight).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert calls[0] == 0 and weight.grad is not None
    # a oneDNN forward keeps its oneDNN backward in fp32 even when backward() runs under autocast
    x.grad = weight.grad = None
    y = onednn.linear(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y.sum().backward()
    assert calls[0] == per_linear() and x.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, torch.ones(64, 48).T @ x.detach(), atol=1e-5, rtol=1e-5)


def test_compiling_and_tracing_keep_f_linear(calls):
    torch._dynamo.reset()
    x, weight, bias = torch.randn(64, 32), torch.randn(24, 32), torch.randn(24)
    compiled = torch.compile(lambda x, w, b: onednn.linear(x, w, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias))
    traced = torch.jit.trace(lambda x: onednn.linear(x, weight, bias), (x,), check_trace=False)
    graph = str(traced.graph)
    assert "aten::linear" in graph and "mkldnn" not in graph
    assert calls[0] == 0
    torch._dynamo.reset()


def test_dtensors_keep_f_linear(calls, tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        x, weight = torch.randn(64, 32), torch.randn(48, 32)
        dx, dw = (distribute_tensor(t, mesh, [Replicate()]).requires_grad_() for t in (x, weight))
        y = onednn.linear(dx, dw)
        y.sum().backward()
        assert calls[0] == 0
        torch.testing.assert_close(y.full_tensor(), F.linear(x, weight))
        torch.testing.assert_close(dw.grad.full_tensor(), torch.ones(64, 48).T @ x)
    finally:
        dist.destroy_process_group()


def test_tied_embeddings_accumulate_both_gradients(calls, make_model, monkeypatch):
    """gpt2 ties lm_head to the token embedding: the logits' weight gradient (oneDNN's) and the
    embedding's add up in the one shared weight, as with F.linear."""
    model = make_model("gpt2", init_std=0.3).train()
    assert model.lm_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = grads()
    assert calls[0] == per_linear() * (4 * model.config.n_layer + 1)  # every linear, lm_head included
    monkeypatch.setenv(onednn.SWITCH, "0")
    reference = grads()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def run_weights(recipe):
    result = train(recipe, progress=False, log=lambda *_: None)
    losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    return losses, load_file(str(result.model_dir / "model.safetensors"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_steps_match_with_the_switch_on_and_off(calls, tiny_recipe, monkeypatch, family):
    """The real trainer (gpt2: tied embeddings, biases), 6 AdamW steps."""
    sections = {"model": {"family": family, "n_layer": 2, "d_model": 64, "n_head": 4,
                          "n_kv_head": None if family == "gpt2" else 2},
                "train": {"lr": 3e-3, "checkpoint_every": 100}}
    losses, weights = run_weights(tiny_recipe(f"{family}-on", **sections))
    assert calls[0] > 0
    monkeypatch.setenv(onednn.SWITCH, "0")
    ran = calls[0]
    reference_losses, reference = run_weights(tiny_recipe(f"{family}-off", **sections))
    assert calls[0] == ran
    assert len(losses) == 6 and losses[-1] < losses[0]
    torch.testing.assert_close(losses, reference_losses, atol=1e-5, rtol=1e-5)
    for name in reference:
        # AdamW moves a weight whose gradient is at rounding level by up to lr per step either
        # way, so a rare element differs by a few % of one step; the rest agree to rounding.
        diff = (weights[name] - reference[name]).abs()
        assert diff.max() < 1e-4 and diff.mean() < 1e-6, (name, diff.max().item(), diff.mean().item())


def test_a_lora_fine_tune_trains_its_adapter_over_a_frozen_base(calls, make_model, monkeypatch):
    def fine_tune():
        model = make_model("llama", init_std=0.3).train()
        apply_lora(model, LoraSettings(r=4, alpha=8, targets=["q_proj", "v_proj"]))
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(8):
            loss = language_model_loss(model, model.lm_head, ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        return losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    losses, adapters = fine_tune()
    assert calls[0] > 0  # the frozen linears (MLP, output projection, lm_head) ran through oneDNN
    assert losses[-1] < losses[0] - 0.1
    monkeypatch.setenv(onednn.SWITCH, "0")
    reference_losses, reference = fine_tune()
    torch.testing.assert_close(losses, reference_losses, atol=1e-5, rtol=1e-5)
    for name in reference:
        torch.testing.assert_close(adapters[name], reference[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
