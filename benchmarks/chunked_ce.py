"""Peak memory and step time of a pretraining step with and without chunked cross-entropy
(`train.loss_chunk`), at a large vocabulary.

Each setup runs in its own process (so that its peak is its own): the lmforge Transformer
(gpt2 family, GPT-2 124M shape by default), batch 4 x 256, the trainer's loss
(`lmforge.train.losses.language_model_loss`), backward, gradient clipping and the trainer's
AdamW step, fp32. Peak memory is the growth of the process's peak resident set over its size
after imports (CPU; glibc's mmap threshold is fixed so freed blocks go back to the OS and the
peak follows live tensors), or torch.cuda.max_memory_allocated (GPU). The step time is the
median over the timed steps, after warm-up steps.

    python benchmarks/chunked_ce.py                                 # GPT-2 124M, vocab 50257, 4 x 256
    python benchmarks/chunked_ce.py --layers 2 --d-model 256 --heads 4   # a small body: the logits dominate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from common import WORKER_ENV, peak_bytes



def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import Transformer
    from lmforge.train.losses import language_model_loss
    from lmforge.train.optim import build_optimizer

    baseline = peak_bytes(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                                    d_model=args.d_model, context=max(1024, args.seq))).to(args.device)
    model.train()
    tc = TrainConfig(lr=1e-4, loss_chunk=args.worker)
    optimizer = build_optimizer(model, tc, torch.device(args.device))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = language_model_loss(model, model.lm_head, ids[:, :-1], ids[:, 1:], tc.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"loss_chunk": args.worker, "step_s": statistics.median(times), "peak_bytes": peak_bytes(args.device) - baseline,
            "losses": losses, "params": model.num_params()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunks", default="0,256,64", help="train.loss_chunk values to compare (0: off).")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    from common import machine

    flags = [str(f) for f in ["--layers", args.layers, "--heads", args.heads, "--d-model", args.d_model,
                              "--vocab", args.vocab, "--batch", args.batch, "--seq", args.seq, "--steps", args.steps,
                              "--warmup", args.warmup, "--threads", args.threads, "--device", args.device]]
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        out = subprocess.run([sys.executable, __file__, *flags, "--worker", str(chunk)], capture_output=True,
                             text=True, check=True, env=WORKER_ENV)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    print(f"machine: {machine()}; device {args.device}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"shape: gpt2 {args.layers} x {args.d_model} ({rows[0]['params']:,} parameters), vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq}; AdamW fp32; {args.steps} timed steps after {args.warmup}")
    print(f"one fp32 copy of the full logits: {tokens * args.vocab * 4 / 2**20:.0f} MiB")
    base = rows[0]
    print(f"{'loss_chunk':>10} {'step s':>8} {'peak MiB':>9} {'vs first':>9}  losses")
    for r in rows:
        print(f"{r['loss_chunk']:>10} {r['step_s']:>8.2f} {r['peak_bytes'] / 2**20:>9.0f} "
              f"{r['peak_bytes'] / base['peak_bytes']:>8.2f}x  {', '.join(f'{x:.6f}' for x in r['losses'])}")


if __name__ == "__main__":
    main()
