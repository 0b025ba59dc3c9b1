"""Shared pieces of the benchmarks: machine description, memory bandwidth, interleaved timing.

Every benchmark runs ours and the peer in one process, alternating repetitions, and
reports medians, because this kind of machine is shared and its speed drifts.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# What an AVX2-only CPU (no AVX-512, no VNNI, no AVX512-BF16) runs, asked of every library that
# picks its instructions at run time: lmforge's kernels (built for haswell), PyTorch's own
# kernels (ATen), oneDNN and MKL. llama.cpp picks at build time, so it needs a build of its own.
AVX2_ENV = {"LMFORGE_NATIVE_ARCH": "haswell", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
EMULATE_FLAG = "--emulate-avx2"
# PyTorch fixes its kernels' instruction set at the first operation, which importing lmforge
# already runs: a script's `--emulate-avx2` takes effect here, when it imports this module.
if any(arg == EMULATE_FLAG or arg.startswith(EMULATE_FLAG + "=") for arg in sys.argv[1:]):
    os.environ.update(AVX2_ENV)

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Worker processes of the memory benchmarks: a fixed mmap threshold makes glibc hand large freed
# blocks back to the OS, so the peak resident set follows the peak of live tensors.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_memory_parser(doc: str, layers: int, d_model: int, heads: int, vocab: int) -> argparse.ArgumentParser:
    """The options of a per-rank memory benchmark (see `rank_memory_table`): the llama model's size,
    and the hidden `--worker WAY ARG OUT` under which torchrun runs the script's ranks."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--d-model", type=int, default=d_model)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # way, its argument, out dir
    return ap


def write_rank_memory(out: Path, way: str, rank: int, before: int, kept: int) -> None:
    """A worker's figures: its resident set `before` the way ran, its peak, and the bytes it kept."""
    import json

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"{way}-{rank}.json").write_text(json.dumps({"before": before, "peak": peak, "kept": kept}))


def rank_memory_table(script: str, title: str, ways: dict[str, int], arg: str, out: Path) -> None:
    """Prints `title`, the machine and load, then runs each way under torchrun (`ways`: its number
    of processes) as `script --worker WAY ARG OUT` and prints every rank's figures in MiB."""
    import json
    import subprocess

    width = max(map(len, ways)) + 1
    print(f"# {title}")
    print(f"# {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'way':{width}} {'rank':>4} {'before MiB':>10} {'peak MiB':>9} {'peak - before':>13} {'kept MiB':>9}")
    for way, nproc in ways.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(script).resolve()), "--worker", way, arg, str(out)]
        done = subprocess.run(cmd, env=WORKER_ENV, capture_output=True, text=True)
        if done.returncode:
            print(f"{way}: failed (exit {done.returncode}): {done.stderr[-2000:]}")
            continue
        for rank in range(nproc):
            r = json.loads((out / f"{way}-{rank}.json").read_text())
            mib = {k: r[k] / 2**20 for k in ("before", "peak", "kept")}
            print(f"{way:{width}} {rank:>4} {mib['before']:>10.0f} {mib['peak']:>9.0f} "
                  f"{mib['peak'] - mib['before']:>13.0f} {mib['kept']:>9.0f}", flush=True)


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


LLAMA_FEATURES_BEYOND_AVX2 = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_INT8")


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def add_emulation_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(EMULATE_FLAG, metavar="LIBDIR", type=Path,
                    help="run everything as on an AVX2-only CPU: lmforge's kernels built for haswell, PyTorch, "
                         "oneDNN and MKL capped at AVX2, and llama.cpp from LIBDIR, a build of llama-cpp-python's "
                         "libraries without AVX-512/VNNI (benchmarks/build_llama_avx2.sh)")


def emulate_avx2(libdir: Path | None) -> None:
    """Check the AVX2-only environment (AVX2_ENV, set when this module was imported) and point
    llama-cpp-python at `libdir`, for this process and the servers it starts. Call it before
    llama_cpp is imported: it reads LLAMA_CPP_LIB_PATH once."""
    if libdir is None:
        return
    if not (libdir / "libllama.so").is_file():
        refuse(f"--emulate-avx2: {libdir} has no libllama.so; build llama.cpp for AVX2 with "
                         "benchmarks/build_llama_avx2.sh and pass the folder it prints")
    if "llama_cpp" in sys.modules:
        refuse("--emulate-avx2: llama_cpp was imported before the emulation was set (a bug in this script)")
    os.environ.update(AVX2_ENV, LLAMA_CPP_LIB_PATH=str(libdir.resolve()))
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        refuse(f"--emulate-avx2: PyTorch already chose {torch.backends.cpu.get_cpu_capability()} "
                         "(a bug in this script: it ran an operation before importing benchmarks/common.py)")
    llama = llama_cpp_build()
    beyond = [f for f in LLAMA_FEATURES_BEYOND_AVX2 if re.search(rf"\b{f} = 1\b", llama)]
    if beyond:
        refuse(f"--emulate-avx2: the llama.cpp in {libdir} was built with {', '.join(beyond)}, which an "
                         "AVX2-only CPU lacks; rebuild it with benchmarks/build_llama_avx2.sh")


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to, from its own verbose header (it prints to fd 1)."""
    with tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(1):
                torch.nn.functional.conv2d(torch.ones(1, 64, 32, 32), torch.ones(64, 64, 3, 3))  # large enough for oneDNN
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        found = re.search(r"isa:([^\n]+)", out.read().decode(errors="replace"))
    return found.group(1).strip() if found else "unknown (oneDNN printed no header)"


def llama_cpp_build() -> str:
    """llama.cpp's compiled-in CPU features and the file its CPU backend was loaded from."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode().strip()
    loaded = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libggml-cpu" in line})
    return f"llama.cpp ({llama_cpp.__version__}) built with: {info}; CPU backend {', '.join(loaded) or 'not loaded yet'}"


def emulation_report() -> str:
    """What ran under --emulate-avx2, each library asked (not the settings echoed back)."""
    return (f"EMULATING AN AVX2-ONLY CPU on this one (same caches and clocks, not a real AVX2-only machine):\n"
            f"  {kernels_build()}\n"
            f"  PyTorch ATen kernels: {torch.backends.cpu.get_cpu_capability()}; oneDNN: {onednn_isa()}; "
            f"MKL capped by MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}\n"
            f"  {llama_cpp_build()}")


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
