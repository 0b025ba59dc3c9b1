"""Shared pieces of the benchmarks: machine description, memory bandwidth, interleaved timing.

Every benchmark runs ours and the peer in one process, alternating repetitions, and
reports medians, because this kind of machine is shared and its speed drifts.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

# Worker processes of the memory benchmarks: a fixed mmap threshold makes glibc hand large freed
# blocks back to the OS, so the peak resident set follows the peak of live tensors.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{_dt.date.today().isoformat()}")


def kernels_build() -> str:
    """Which build of lmforge's kernels runs (-march, LMFORGE_NATIVE_ARCH), the instruction set it
    decodes with, the CPU's SIMD flags and the load average: what a figure was measured on."""
    from lmforge import native
    from lmforge.native import decode_abi

    lib = native.kernels()
    flags = [f for f in native._cpu_flags().split(":", 1)[-1].split() if f.startswith(("avx", "fma", "f16c"))]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"lmforge kernels: -march={os.environ.get('LMFORGE_NATIVE_ARCH') or 'native'}, decoding with "
            f"{decode_abi.isa(lib) if lib is not None else 'none (no kernels)'}; CPU flags: {' '.join(flags)}; "
            f"load average {load}")


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of streaming reads (torch.sum over a buffer much larger than the caches)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy, counting the read and the write."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t))
    return best


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Call each rate function once per round, alternating; return the median rate of each."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            rates[name].append(fn())
    return {name: statistics.median(v) for name, v in rates.items()}


def peak_bytes(device: str) -> int:
    """Peak memory of this process: CUDA's allocator peak, or the peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_cpp_decoder(path, threads: int, context: int, vocab: int):
    """Greedy decoding of a GGUF file through llama.cpp's C API (logits of the last position
    only): decode(prompt ids, n) -> n new ids."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          logits_all=False, verbose=False)

    def last_logits() -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))

    def decode(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            out.append(int(last_logits().argmax()))
            if i < n - 1:
                llm.eval([out[-1]])
        return out

    return decode
