"""The weight-only int8/int4 matmul kernels in `qmatmul.c`, compiled on first use.

`gcc -O3 -march=native` builds them in about a second for the CPU at hand (AVX2 or
AVX-512 alike) into the lmforge cache, keyed by the source, the compiler and the CPU's
flags, so a copied home directory never runs code built for another CPU. Without a C
compiler, or with LMFORGE_NATIVE=0, `kernels()` is None and `QuantizedLinear` falls back
to dequantize-then-matmul in PyTorch (correct, not fast); `lmforge quantize` says so.

Called through ctypes: the few microseconds per call are small beside a layer's matmul.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("qmatmul.c")
_p, _i = ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "qlinear": [_i, _p, _i, _i, _p, _p, _p, _i, _i, _p, _p],
    "dequant": [_i, _p, _p, _p, _i, _i, _i, _p],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path | None:
    from lmforge.data.corpora import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"qmatmul-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        return None
    os.replace(tmp, target)  # atomic: a concurrent builder never sees a half-written library
    return target


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no compiler, LMFORGE_NATIVE=0)."""
    if os.environ.get("LMFORGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not SOURCE.is_file():
        return None
    torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so the kernels share its threads
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path)) if path else None
    except OSError:
        return None
    if lib is None:
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
