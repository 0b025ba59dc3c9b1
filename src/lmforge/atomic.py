"""Writing a directory all at once: staged under a temporary name, renamed into place.

A crash or Ctrl-C in the middle leaves the previous version (or nothing) where a complete
one is expected, never a half-written one; the staging folder is removed on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a staging directory that replaces `out` only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes the folder private (0700); the result should have ordinary permissions.
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
