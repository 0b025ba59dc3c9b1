"""lmforge's C kernels, compiled on first use: one shared library from the sources here.

- `qmatmul.c`: weight-only int8/int4 matmuls, for a few rows and (`qgemm`) for many (what
  `QuantizedLinear` calls);
- `decode.c`: a whole decoding step (what `lmforge.infer.native_decode` calls), its interface
  in `decode.h` (mirrored in ctypes by `decode_abi.py`, checked at load time) and its batched
  matmuls in one file per instruction set (`decode_avx512.h`, `decode_avx2.h`);
- `elementwise.c`: the softmax cross-entropy with its gradient, and GELU with its derivative,
  for training steps (`lmforge.train.losses`, `lmforge.model.activations`);
- `prefill.c`: a prefill's RMSNorm (residual add folded in), RoPE and SwiGLU, one pass each
  (`lmforge.model.fused`);
- `kernels.h`: the fp32/int8/int4 inner loops and the vectorized exponential they share.

`gcc -O3 -march=native` builds them in a few seconds for the CPU at hand (AVX2 or AVX-512
alike) into the lmforge cache, keyed by the sources, the compiler, the target and the CPU's
flags, so a copied home directory never runs code built for another CPU; `make install`
builds them once up front. LMFORGE_NATIVE_ARCH names another `-march` target, e.g.
`haswell` to build and run the AVX2 kernels on an AVX-512 machine.

Without a C compiler, or with LMFORGE_NATIVE=0, `kernels()` is None: `QuantizedLinear`
falls back to dequantize-then-matmul in PyTorch and decoding to the PyTorch model (correct,
not fast); `lmforge quantize` says so.

Called through ctypes: a few microseconds per call, small beside a matmul or a decode step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "qmatmul.c", HERE / "decode.c", HERE / "elementwise.c", HERE / "prefill.c"]
HEADERS = sorted(HERE.glob("*.h"))
_p, _i = ctypes.c_void_p, ctypes.c_int
SIGNATURES = {  # name: (argument types, result type)
    "qlinear": ([_i, _p, _i, _i, _p, _p, _p, _i, _i, _p, _p], None),
    "dequant": ([_i, _p, _p, _p, _i, _i, _i, _p], None),
    "qgemm_supported": ([_i, _i, _i], _i),
    "qgemm": ([_i, _p, _i, _i, _p, _p, _p, _i, _i, _p, _p], _i),
    "decode_supported": ([], _i),
    "decode_step": ([_p, _p, _i, _p], None),
    "elementwise_supported": ([], _i),
    "cross_entropy_rows": ([_p, _i, _i, _i, _p, ctypes.c_int64, _i, _p, _i], None),
    "gelu_forward": ([_p, _p, ctypes.c_int64, _i, _i], None),
    "gelu_backward": ([_p, _p, _p, ctypes.c_int64, _i, _i], None),
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    """The C compiler to build with: $CC, else gcc or cc on the PATH; None without one."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(arch: str = "native", cc: str | None = None) -> Path | None:
    """The kernels built for `-march=arch` (cached), or None where the compiler fails."""
    from lmforge.cache import cache_dir

    cc = cc or compiler()
    if cc is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(code + "\n".join([cc, version, arch, _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lmforge-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cc, "-O3", f"-march={arch}", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        # Said, not silent: without the kernels decoding and the loss still work, several times slower.
        first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
        print(f"lmforge: the C kernels did not build for -march={arch} ({first.strip()}); decoding and the loss "
              "run in PyTorch, slower", file=sys.stderr)
        return None
    os.replace(tmp, target)  # atomic: a concurrent builder never sees a half-written library
    return target


def load(path: Path | str) -> ctypes.CDLL:
    """A built library, its functions typed (SIGNATURES)."""
    torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so the kernels share its threads
    lib = ctypes.CDLL(str(path))
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no compiler, LMFORGE_NATIVE=0)."""
    if os.environ.get("LMFORGE_NATIVE", "1") == "0" or not all(p.is_file() for p in SOURCES):
        return None
    try:
        path = build(os.environ.get("LMFORGE_NATIVE_ARCH") or "native")
        return load(path) if path else None
    except OSError:
        return None


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.cache  # asked on every forward of the gpt2 MLP and every loss: one ctypes call, once
def elementwise() -> ctypes.CDLL | None:
    """The kernels of elementwise.c (the softmax cross-entropy, GELU), or None where they
    cannot run (no compiler, or a CPU without AVX2): callers then use PyTorch's own ops."""
    lib = kernels()
    return lib if lib is not None and lib.elementwise_supported() else None
