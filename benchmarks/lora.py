"""LoRA vs full fine-tuning, and lmforge's LoRA vs Hugging Face PEFT, at the GPT-2 124M shape.

Four training setups on the same model shape, batch and AdamW settings, each in its own
process (so that its peak memory is its own):

    ours-full    lmforge Transformer (gpt2 family), every parameter trained
    ours-lora    the same with lmforge LoRA (r 8, alpha 16, all block linears: c_attn, c_proj, c_fc)
    ours-qlora   the same over a frozen int4 base (groups of 32, lmforge.compress)
    peft-lora    transformers GPT2LMHeadModel + peft LoRA with the same r, alpha and targets

A step is forward, cross-entropy, backward and an AdamW step; the time is the median over the
timed steps, after warm-up steps. Peak memory is the growth of the process's peak resident
set over its size after imports (CPU), or torch.cuda.max_memory_allocated (GPU). Also reported: trainable fraction and adapter file size.
Targets: LoRA peak memory <= 0.5x full fine-tuning; our LoRA step <= 1.0x PEFT's.

Activations are shared by LoRA and full fine-tuning alike, so at larger batches they, not the
optimizer state LoRA saves, fill the memory. `--checkpointing` (recompute each block in
backward; PEFT: transformers' gradient checkpointing) and `--loss-chunk N` (the cross-entropy
over N positions of logits at a time, `train.loss_chunk`; ours only) apply to every setup.

    python benchmarks/lora.py                              # GPT-2 124M, batch 4 x 256
    python benchmarks/lora.py --layers 2 --steps 2         # quick
    python benchmarks/lora.py --checkpointing --loss-chunk 1024 --setups ours-lora,ours-full
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import WORKER_ENV, peak_bytes

SETUPS = ("ours-lora", "peft-lora", "ours-full", "ours-qlora")


def build(args, setup: str):
    """(model, loss(ids) -> next-token cross-entropy, adapter saver or None)."""
    torch.manual_seed(0)
    if setup == "peft-lora":
        import peft
        import transformers

        cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=args.d_model,
                                      n_layer=args.layers, n_head=args.heads)
        hf = transformers.GPT2LMHeadModel(cfg).to(args.device)
        if args.checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                        target_modules=["c_attn", "c_proj", "c_fc"],
                                                        fan_in_fan_out=True))
        return model, logits_loss(lambda ids: model(input_ids=ids).logits), lambda d: model.save_pretrained(d)
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.adapters import apply_lora, save_adapter
    from lmforge.model.lora import LoraSettings

    model = Transformer(ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                                    d_model=args.d_model, context=1024))
    if setup == "ours-qlora":
        from lmforge.train.finetune import QloraSettings, quantize_base

        quantize_base(model, QloraSettings(bits=4, group_size=32))
    if setup in ("ours-lora", "ours-qlora"):
        apply_lora(model, LoraSettings(r=args.r, alpha=2 * args.r, targets="all-linear"))
    model.to(args.device)
    if args.checkpointing:
        from lmforge.train.distributed import checkpoint_activations

        checkpoint_activations(model)
    saver = (lambda d: save_adapter(model, d, "benchmark")) if setup != "ours-full" else None
    if args.loss_chunk:
        from lmforge.train.losses import chunked_cross_entropy

        def loss_of(ids):
            hidden = model(ids[:, :-1], return_hidden=True)
            return chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, ids[:, 1:].flatten(),
                                         args.loss_chunk)
        return model, loss_of, saver
    return model, logits_loss(model), saver


def logits_loss(forward):
    """ids (B, T + 1) -> the next-token cross-entropy of `forward`'s logits."""
    return lambda ids: torch.nn.functional.cross_entropy(forward(ids[:, :-1]).float().flatten(0, 1),
                                                         ids[:, 1:].flatten())


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (every worker imports the same libraries before its baseline)
    import transformers  # noqa: F401

    import lmforge.train.finetune  # noqa: F401

    baseline = peak_bytes(args.device)
    model, loss_of, saver = build(args, args.worker)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if args.worker == "ours-qlora":
        from lmforge.model.lora import trainable_parameters

        trainable, total = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    times = []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    adapter_bytes = None
    if saver is not None:
        with tempfile.TemporaryDirectory() as d:
            saver(d)
            adapter_bytes = sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
    return {"setup": args.worker, "step_s": statistics.median(times), "peak_bytes": peak_bytes(args.device) - baseline,
            "trainable": trainable, "total": total, "adapter_bytes": adapter_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="Run every setup this many times, alternating; medians.")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--checkpointing", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--loss-chunk", type=int, default=0, help="cross-entropy over this many positions at a time "
                   "(ours; 0: all logits at once)")
    p.add_argument("--worker", choices=SETUPS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from common import machine

    flags = ["--layers", args.layers, "--heads", args.heads, "--d-model", args.d_model, "--vocab", args.vocab,
             "--batch", args.batch, "--seq", args.seq, "--r", args.r, "--steps", args.steps, "--warmup", args.warmup,
             "--threads", args.threads, "--device", args.device, "--loss-chunk", args.loss_chunk]
    if args.checkpointing:
        flags.append("--checkpointing")
    flags = [str(f) for f in flags]
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for setup in args.setups.split(","):
            out = subprocess.run([sys.executable, __file__, *flags, "--worker", setup], capture_output=True,
                                 text=True, check=True, env=WORKER_ENV)
            results.setdefault(setup, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {s: {"step_s": statistics.median(r["step_s"] for r in rs), "peak_bytes": max(r["peak_bytes"] for r in rs),
                **{k: rs[0][k] for k in ("trainable", "total", "adapter_bytes")}} for s, rs in results.items()}
    print(f"machine: {machine()}; device {args.device}")
    print(f"shape: gpt2 {args.layers} x {args.d_model}, vocab {args.vocab}; batch {args.batch} x {args.seq}; "
          f"LoRA r {args.r} on c_attn/c_proj/c_fc; {args.steps} timed steps after {args.warmup}, {args.rounds} round(s); "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}, loss chunk {args.loss_chunk or 'off'}")
    print(f"{'setup':<11} {'step s':>8} {'peak MiB':>9} {'trainable':>12} {'fraction':>9} {'adapter':>10}")
    for s, r in rows.items():
        adapter = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r["adapter_bytes"] else "-"
        print(f"{s:<11} {r['step_s']:>8.3f} {r['peak_bytes'] / 2**20:>9.0f} {r['trainable']:>12,} "
              f"{r['trainable'] / r['total']:>8.2%} {adapter:>10}")
    if "ours-lora" in rows and "ours-full" in rows:
        print(f"LoRA peak memory / full fine-tuning: {rows['ours-lora']['peak_bytes'] / rows['ours-full']['peak_bytes']:.2f}x "
              "(target <= 0.5x)")
    if "ours-lora" in rows and "peft-lora" in rows:
        print(f"our LoRA step time / PEFT's: {rows['ours-lora']['step_s'] / rows['peft-lora']['step_s']:.2f}x "
              "(target <= 1.0x)")
    if "ours-qlora" in rows and "ours-lora" in rows:
        print(f"QLoRA (int4) peak memory / LoRA: {rows['ours-qlora']['peak_bytes'] / rows['ours-lora']['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
