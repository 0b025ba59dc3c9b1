"""Candidate low-bit CPU matmul kernels side by side, at decode shapes, in one run.

    python benchmarks/lowbit_kernels.py [--rows 1] [--threads N] [--layers 12] [--shapes 768x2304,... | ""]

Each candidate computes y = x @ W^T for x (rows, K) fp32 and a W (N, K) held in its own
format. Two tables:

1. per shape, the same weight again and again (it stays in the CPU caches): the kernel's
   arithmetic speed, microseconds per call and speed-up over fp32 `F.linear`;
2. the decoding workload: every matmul of a GPT-2 124M token (`--layers` x [attn.qkv
   768x2304, attn.proj 768x768, mlp.up 768x3072, mlp.down 3072x768] + lm_head 768x50257),
   each with its own weight, so the weights stream from memory as they do in decoding.
   This is the table that decides; GB/s is over the bytes that format reads.

A candidate that does not install or does not run here is listed with the reason.
onnxruntime is optional; torchao 0.18 was measured with `pip install --no-deps --target DIR
torchao` and `PYTHONPATH=DIR` (its wheel declares no torch requirement, so it pulls none).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lmforge import native
from lmforge.compress.qlinear import QuantizedLinear, DynamicInt8Linear, quantize_int4, quantize_int8

DEFAULT_SHAPES = "768x2304,768x768,768x3072,3072x768,768x50257"


def timed(fn, repeat: int) -> float:
    """Median microseconds per call over `repeat` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    samples = []
    per = max(1, repeat // 10)
    for _ in range(10):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        samples.append((time.perf_counter() - t) / per)
    return statistics.median(samples) * 1e6


def candidates(w: torch.Tensor, x: torch.Tensor, group: int):
    """(name, bytes of weight read, fn, reference-error) for every candidate that builds here."""
    N, K = w.shape
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w
    yield "fp32 F.linear", w.numel() * 4, lambda: F.linear(x, w)

    q8 = QuantizedLinear.from_float(linear, 8)
    if native.kernels() is not None:
        yield "int8 lmforge native (weight-only)", N * K + N * 4, lambda: q8(x)
    dyn = DynamicInt8Linear.from_float(linear)
    yield "int8 fbgemm dynamic (w8a8, per-channel)", N * K + N * 4, lambda: dyn(x)

    q, scale = quantize_int8(w)
    try:
        torch.ops.aten._weight_int8pack_mm(x, q, scale)
        yield "int8 aten _weight_int8pack_mm", N * K + N * 4, lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)
    except Exception as e:  # noqa: BLE001 - a candidate that does not run is reported, not fatal
        yield f"int8 aten _weight_int8pack_mm: {type(e).__name__}", 0, None

    q4 = QuantizedLinear.from_float(linear, 4, group)
    if native.kernels() is not None:
        yield f"int4 lmforge native g{group}", N * K // 2 + N * K // group * 8, lambda: q4(x)
    try:
        yield from _aten_int4(w, x, group)
    except Exception as e:  # noqa: BLE001
        yield f"int4 aten _weight_int4pack_mm_for_cpu: {type(e).__name__}", 0, None
    try:
        yield from _onnxruntime(w, x, group)
    except ImportError:
        yield "onnxruntime: not installed", 0, None
    try:
        yield from _torchao(linear, x, group)
    except ImportError:
        yield "torchao: not installed", 0, None
    except Exception as e:  # noqa: BLE001
        yield f"torchao: {type(e).__name__}: {str(e)[:60]}", 0, None


def _aten_int4(w, x, group):
    N, K = w.shape
    packed, scale, zero = quantize_int4(w, group)
    from lmforge.compress.qlinear import unpack_int4

    codes = unpack_int4(packed).to(torch.int32)
    # aten wants (K/g, N, 2) scale-and-offset with W = (q - 8) * scale + offset.
    scales_zeros = torch.stack([scale, scale * (8 - zero.float())], dim=-1).transpose(0, 1).contiguous()
    packed_aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed_aten, group, scales_zeros)  # noqa: E731
    fn()
    yield f"int4 aten _weight_int4pack_mm_for_cpu g{group}", N * K // 2 + N * K // group * 8, fn


def _onnxruntime(w, x, group):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    N, K = w.shape
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()

    def session(nodes, inits):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    xn = x.numpy()
    fp32 = session([helper.make_node("MatMul", ["x", "wt"], ["y"])], [numpy_helper.from_array(w.T.contiguous().numpy(), "wt")])
    yield "onnxruntime MatMul fp32", N * K * 4, lambda: fp32.run(None, {"x": xn})

    # DynamicQuantizeMatMul: uint8 activations quantized per call, int8 weights per channel.
    q, scale = quantize_int8(w)
    dq = session([helper.make_node("DynamicQuantizeMatMul", ["x", "b", "s", "z"], ["y"], domain="com.microsoft")],
                 [numpy_helper.from_array(q.T.contiguous().numpy(), "b"),
                  numpy_helper.from_array(scale.numpy().astype(np.float32), "s"),
                  numpy_helper.from_array(np.zeros(N, np.int8), "z")])
    dq.run(None, {"x": xn})
    yield "int8 onnxruntime DynamicQuantizeMatMul (w8a8)", N * K + N * 4, lambda: dq.run(None, {"x": xn})

    # MatMulNBits: 4-bit blocks along K, uint8 zero points (default 8 when absent).
    packed, s4, zeros = quantize_int4(w, group)
    from lmforge.compress.qlinear import unpack_int4

    codes = unpack_int4(packed).numpy().reshape(N, K // group, group)
    blob = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    zeros = zeros.numpy()
    zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)) if zeros.shape[1] % 2 == 0 else None
    for level in (0, 4):
        inits = [numpy_helper.from_array(blob, "b"), numpy_helper.from_array(s4.numpy().astype(np.float32).reshape(-1), "s")]
        inputs = ["x", "b", "s"]
        if zp is not None:
            inits.append(numpy_helper.from_array(zp.reshape(-1), "zp"))
            inputs.append("zp")
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=group, accuracy_level=level)
        sess = session([node], inits)
        sess.run(None, {"x": xn})
        what = "fp32 compute" if level == 0 else "int8 activations"
        yield (f"int4 onnxruntime MatMulNBits g{group} ({what})", N * K // 2 + N * K // group * 4,
               lambda sess=sess: sess.run(None, {"x": xn}))


def _torchao(linear, x, group):
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(linear)
    quantize_(m, Int8WeightOnlyConfig())
    m(x)
    N, K = linear.weight.shape
    yield "int8 torchao Int8WeightOnlyConfig", N * K + N * 4, lambda: m(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (1 = batch-1 decoding)")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN")
    ap.add_argument("--threads", type=int, default=None, help="torch/ORT/kernel threads (default: all cores)")
    ap.add_argument("--layers", type=int, default=12, help="layers in the decode workload (0: skip it)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the decode workload")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}  threads {torch.get_num_threads()}  "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}  rows {args.rows}  python {sys.version.split()[0]}")
    totals: dict[str, float] = {}
    with torch.inference_mode():
        for shape in filter(None, args.shapes.split(",")):
            K, N = (int(v) for v in shape.split("x"))
            w = torch.randn(N, K) * 0.02
            x = torch.randn(args.rows, K)
            ref = F.linear(x, w)
            print(f"\n## K={K} N={N}")
            print(f"{'candidate':58s} {'us/call':>9s} {'vs fp32':>8s} {'GB/s':>7s} {'rel err':>8s}")
            base = None
            for name, nbytes, fn in candidates(w, x, args.group):
                if fn is None:
                    print(f"{name:58s} {'-':>9s}")
                    continue
                out = fn()
                out = torch.as_tensor(out[0] if isinstance(out, list) else out)
                err = ((out - ref).norm() / ref.norm()).item()
                us = timed(fn, args.repeat if N < 20000 else max(20, args.repeat // 10))
                base = base or us
                totals[name] = totals.get(name, 0.0) + us
                print(f"{name:58s} {us:9.1f} {base / us:7.2f}x {nbytes / us / 1e3:7.1f} {err:8.4f}")
    print("\n## all shapes (sum of us/call, one GPT-2 layer + lm_head, cache-resident)")
    for name, us in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"{name:58s} {us:9.1f} {totals['fp32 F.linear'] / us:7.2f}x")
    if args.layers:
        decode_stack(args)


def decode_stack(args) -> None:
    """All matmuls of one decoded token, each weight distinct (streamed from memory)."""
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * args.layers + [(768, 50257)]
    by_name: dict[str, list] = {}
    total_bytes: dict[str, int] = {}
    xs = {K: torch.randn(args.rows, K) for K in (768, 3072)}
    with torch.inference_mode():
        for K, N in shapes:
            w = torch.randn(N, K) * 0.02
            for name, nbytes, fn in candidates(w, xs[K], args.group):
                if fn is not None:
                    by_name.setdefault(name, []).append(fn)
                    total_bytes[name] = total_bytes.get(name, 0) + nbytes
        print(f"\n## decode workload: {len(shapes)} matmuls of GPT-2 124M, distinct weights "
              f"(ms per token, median of {args.rounds} interleaved rounds)")
        print(f"{'candidate':58s} {'ms/token':>9s} {'vs fp32':>8s} {'GB/s':>7s} {'MB':>7s}")
        complete = {name: fns for name, fns in by_name.items() if len(fns) == len(shapes)}
        samples: dict[str, list[float]] = {name: [] for name in complete}
        for name, fns in complete.items():  # warm-up
            for fn in fns:
                fn()
        # Interleaved rounds: a busy moment of a shared machine hits every candidate alike.
        for _ in range(args.rounds):
            for name, fns in complete.items():
                t = time.perf_counter()
                for fn in fns:
                    fn()
                samples[name].append((time.perf_counter() - t) * 1e3)
        results = {name: statistics.median(v) for name, v in samples.items()}
        base = results["fp32 F.linear"]
        for name, ms in sorted(results.items(), key=lambda kv: kv[1]):
            print(f"{name:58s} {ms:9.2f} {base / ms:7.2f}x {total_bytes[name] / ms / 1e6:7.1f} {total_bytes[name] / 1e6:7.1f}")


if __name__ == "__main__":
    main()
