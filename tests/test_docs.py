"""The docs' examples run: every ```bash and ```python block of the pages listed here,
in order, in one fresh directory per page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXECUTED_PAGES = ["training.md", "eval.md", "explain.md", "scale.md", "finetune.md", "performance.md"]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)


def blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((DOCS / page).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_examples_run(page, tmp_path):
    env = dict(os.environ, LMFORGE_CACHE=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    found = blocks(page)
    assert found, f"{page} has no runnable examples"
    for lang, code in found:
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page} example failed:\n{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
