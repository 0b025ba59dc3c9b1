"""Validation perplexity of every compression method against the fp32 model, in one run.

    python benchmarks/quant_quality.py --model runs/quickstart/model --data runs/data/shakespeare-2048

Perplexity is scored on whole sequences (quantized layers then run a BLAS matmul on the
dequantized weight); the last column checks the decode path (one token at a time through
the KV cache, i.e. the native kernel with activations quantized per block of 32) on two
sequences against the batched path on the same tokens.

Quantization: int8, int4 round-to-nearest, int4 GPTQ (calibrated), w8a8. Pruning at 50%
(unstructured and 2:4): magnitude and Wanda. Targets (issue 6): int8 within 1% of fp32;
int4 GPTQ within 5% and better than round-to-nearest; Wanda better than magnitude.
The group size is 128 where it divides every layer, else the largest of 64/32 that does.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lmforge.compress.calibration import calibration_tokens
from lmforge.compress.compare import validation_perplexity
from lmforge.compress.prune import prune_model
from lmforge.compress.quantize import fitting_group_size, quantize_model


@torch.inference_mode()
def decode_path_loss(model, tokens: torch.Tensor) -> float:
    """Mean NLL of `tokens` fed one at a time through the KV cache: the rows=1 path that
    decoding takes (for quantized layers, the native kernel with int8 activations)."""
    total, count = 0.0, 0
    for row in tokens:
        cache = model.new_cache(1, capacity=len(row))
        for t in range(len(row) - 1):
            logits = model(row[None, t:t + 1], cache, last_only=True)[0, -1]
            total -= torch.log_softmax(logits.float(), -1)[row[t + 1]].item()
            count += 1
    return total / count


@torch.inference_mode()
def batched_loss(model, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a prepared data directory (calibration: train, scoring: val)")
    ap.add_argument("--samples", type=int, default=256, help="calibration sequences")
    ap.add_argument("--max-batches", type=int, default=40, help="validation batches of 8 sequences")
    ap.add_argument("--threads", type=int, default=None, help="1 is steadier on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lmforge

    m = lmforge.load(args.model)
    group = fitting_group_size(m.model)
    T = m.config.context
    calibration = calibration_tokens(args.data, m.tokenizer, m.config.vocab, args.samples, T)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  model {args.model} "
          f"({m.model.num_params() / 1e6:.1f}M params)  group size {group}  calibration {len(calibration)}x{T} tokens")

    def ppl(model) -> float:
        m.model, saved = model, m.model
        try:
            return validation_perplexity(m, args.data, args.max_batches)
        finally:
            m.model = saved

    fp32 = ppl(m.model)
    print(f"fp32 {fp32:.3f}", flush=True)
    results = {"fp32": fp32}
    probe = calibration_tokens(args.data, m.tokenizer, m.config.vocab, 2, T, seed=1)
    decode = {"fp32": decode_path_loss(m.model, probe) - batched_loss(m.model, probe)}
    for method in ("int8", "w8a8", "int4", "gptq"):
        quantized = quantize_model(copy.deepcopy(m.model), method, group, calibration)
        results[method] = ppl(quantized)
        decode[method] = decode_path_loss(quantized, probe) - batched_loss(quantized, probe)
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda"):
            pruned = copy.deepcopy(m.model)
            prune_model(pruned, 0.5, method, pattern, calibration if method == "wanda" else None)
            results[f"{method} 50% {pattern}"] = ppl(pruned)

    print(f"{'variant':28s} {'perplexity':>11s} {'vs fp32':>9s}   decode path vs batched (nats/token)")
    for name, value in results.items():
        extra = f"   {decode[name]:+.5f}" if name in decode else ""
        print(f"{name:28s} {value:11.3f} {value / fp32 - 1:+8.2%}{extra}")
    checks = [
        ("int8 within 1% of fp32", results["int8"] <= fp32 * 1.01),
        (f"int4 g{group} GPTQ within 5% of fp32", results["gptq"] <= fp32 * 1.05),
        ("GPTQ better than round-to-nearest", results["gptq"] < results["int4"]),
        ("Wanda better than magnitude at 50%", results["wanda 50% unstructured"] < results["magnitude 50% unstructured"]),
        ("Wanda better than magnitude at 2:4", results["wanda 50% 2:4"] < results["magnitude 50% 2:4"]),
    ]
    for what, ok in checks:
        print(f"{'met   ' if ok else 'MISSED'} {what}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
