"""Shared pieces of the benchmarks: machine description, memory bandwidth, interleaved timing.

Every benchmark runs ours and the peer in one process, alternating repetitions, and
reports medians, because this kind of machine is shared and its speed drifts.
"""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from collections.abc import Callable

import torch


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
