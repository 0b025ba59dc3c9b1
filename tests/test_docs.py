"""Every page's examples run: each ```bash, ```sh and ```python block of every docs/*.md page,
in order, in one fresh directory per page.

A page may assume the user's own files; the stand-ins are made here, as small as will do:
`runs/quickstart/model` and `models/mine` (a model trained for a few steps in the quickstart
recipe's shape) and Hugging Face checkpoints under `~/models/` (tiny random ones:
nothing can be downloaded here). A block may start a server in the background (`&`): every
process a page started is stopped when the page ends. ```console blocks show commands for
what this machine lacks (a cluster, a container runtime, a hub download, a long benchmark)
and are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme_tour import save_tiny_qwen2

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
BLOCK = re.compile(r"^```(bash|sh|python)\n(.*?)^```", re.M | re.S)
STAND_IN_RECIPE = ["quickstart", "--train.max_steps", "20", "--eval.every", "20", "--train.dtype", "float32",
                   "--no-progress"]


def blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((DOCS / page).read_text())


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A directory holding what the pages assume the user has (copied into each page's directory)."""
    root = tmp_path_factory.mktemp("stand-ins")
    work, home = root / "work", root / "home"
    work.mkdir()
    env = dict(os.environ, LMFORGE_CACHE=str(root / "cache"))
    subprocess.run([sys.executable, "-m", "lmforge", "train", *STAND_IN_RECIPE], cwd=work, env=env, check=True,
                   capture_output=True, timeout=600)
    shutil.rmtree(work / "runs" / "quickstart" / "checkpoints")
    (work / "runs" / "quickstart" / "latest").unlink(missing_ok=True)
    shutil.copytree(work / "runs" / "quickstart" / "model", work / "models" / "mine")
    for name in ("Qwen2-0.5B", "Llama-3.2-1B"):
        save_tiny_qwen2(home / "models" / name)
    return root


def stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)])
def test_page_examples_run(page, tmp_path, stand_ins):
    found = blocks(page)
    shutil.copytree(stand_ins, tmp_path, dirs_exist_ok=True)
    work = tmp_path / "work"
    env = dict(os.environ, HOME=str(tmp_path / "home"), LMFORGE_CACHE=str(tmp_path / "cache"), COLUMNS="100",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    groups = []
    try:
        for lang, code in found:
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang in ("bash", "sh") else [sys.executable, "-c", code]
            # files, not pipes: a server started with `&` keeps its output open after the block ends
            with open(tmp_path / "stdout", "w+") as out_file, open(tmp_path / "stderr", "w+") as err_file:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out_file, stderr=err_file,
                                        start_new_session=True)
                groups.append(proc.pid)
                proc.wait(timeout=300)
                out, err = (f.seek(0) or f.read() for f in (out_file, err_file))
            assert proc.returncode == 0, f"{page} example failed:\n{code}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    finally:
        for pgid in groups:
            stop_group(pgid)


def test_pages_without_examples_show_no_commands():
    """A page without runnable blocks must not hide commands in unlabelled fences."""
    for page in PAGES:
        if blocks(page):
            continue
        text = (DOCS / page).read_text()
        assert not re.search(r"^```\n\s*(lmforge|python|curl) ", text, re.M), \
            f"{page} shows commands in a fence the tests do not run; label it ```bash"
