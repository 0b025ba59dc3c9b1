"""Where lmforge keeps what it builds or fetches once (compiled kernels, built-in corpora)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LMFORGE_CACHE, else ~/.cache/lmforge."""
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root)
