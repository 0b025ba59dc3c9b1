"""Which checkpoint a run continues from, and whether its files are the ones that were written.

Every checkpoint folder (pretraining, sharded or not, and fine-tuning) gets `checksums.sha256`
when it is committed: the sha256 of each of its files, in `sha256sum` format, so that
`cd runs/NAME/checkpoints/step-000500 && sha256sum -c checksums.sha256` checks it by hand too.
A checkpoint written before checksums were recorded is checked against what its `lmforge.json`
recorded of the weights (and for the files it must have).

On resume the newest intact checkpoint wins: `latest` when it points at one, else the
checkpoints by step, newest first. A corrupt one is named (which file, why), set aside as
`step-NNNNNN.corrupt` so that pruning and later resumes skip it, and an earlier one is used;
`--resume-from step-N` (or a checkpoint path) chooses one explicitly, and a corrupt choice stops.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model_dir import sha256_file

CHECKSUMS = "checksums.sha256"
TRAINER_STATE = "trainer.pt"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(folder: Path) -> int | None:
    match = _STEP_FOLDER.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The committed checkpoints of a run (`checkpoints/step-NNNNNN`), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of)


def save_trainer_state(state: dict, path: Path) -> None:
    """torch.save through a file opened here: a failed write (a read-only directory, a full disk)
    is then an OSError naming the file, as any other write, not torch's RuntimeError."""
    import torch

    with open(path, "wb") as f:
        torch.save(state, f)


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file under `folder` (called on the staging folder, last)."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        lines.append(f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}\n")
    (folder / CHECKSUMS).write_text("".join(lines))


def _recorded(folder: Path) -> dict[str, str] | str:
    """{relative path: sha256} recorded for `folder`, or what is wrong with the record."""
    manifest = folder / CHECKSUMS
    if manifest.is_file():
        recorded = {}
        for line in manifest.read_text(errors="replace").splitlines():
            digest, sep, name = line.partition("  ")
            rel = Path(name)
            if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or rel.is_absolute() or ".." in rel.parts:
                return f"{manifest} is corrupt (line {line[:80]!r})"
            recorded[name] = digest
        return recorded
    # Written before checksums were recorded: lmforge.json's sha256 of the weights, when it has them.
    for required in (TRAINER_STATE,):
        if not (folder / required).is_file():
            return f"{folder / required} is missing"
    try:
        weights = json.loads((folder / "lmforge.json").read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        weights = None
    return {k: v for k, v in weights.items() if isinstance(k, str) and Path(k).name == k} \
        if isinstance(weights, dict) else {}


def verify_checkpoint(folder: Path) -> str | None:
    """None when every recorded file is there with its recorded sha256; else what is wrong, naming the file."""
    if not folder.is_dir():
        return f"{folder} is missing"
    recorded = _recorded(folder)
    if isinstance(recorded, str):
        return recorded
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match the sha256 recorded when it was written"
    return None


def _chosen(run_dir: Path, choice: str) -> Path:
    """`step-N`, `N` or a checkpoint path -> the checkpoint folder."""
    match = re.fullmatch(r"(?:step-)?(\d+)", choice.strip())
    folder = run_dir / "checkpoints" / checkpoint_name(int(match.group(1))) if match else Path(choice)
    if not folder.is_dir():
        have = ", ".join(p.name for p in checkpoint_folders(run_dir)) or "none"
        raise LmforgeError(f"--resume-from {choice}: no such checkpoint in {run_dir} (checkpoints: {have})")
    return folder


def find_checkpoint(run_dir: Path, choice: str | None = None, log: Callable[[str], None] = print,
                    set_aside: bool = False) -> Path:
    """The checkpoint to continue `run_dir` from: `choice` (which must be intact), else the newest
    intact one, with a warning line for each corrupt or missing one passed over. `set_aside`
    renames the corrupt ones passed over (resume does; reading-only callers do not)."""
    run_dir = Path(run_dir)
    if choice is not None:
        folder = _chosen(run_dir, choice)
        if problem := verify_checkpoint(folder):
            raise LmforgeError(f"checkpoint {folder} is corrupt: {problem}; choose another with --resume-from")
        return folder
    candidates: list[Path] = []
    link = run_dir / "latest"
    if link.is_symlink():
        target = run_dir / os.readlink(link)
        if target.is_dir():
            candidates.append(target.resolve())
        else:
            log(f"warning: {link} points at {os.readlink(link)}, which does not exist; "
                "looking for the newest intact checkpoint")
    candidates += [p.resolve() for p in reversed(checkpoint_folders(run_dir)) if p.resolve() not in candidates]
    if not candidates:
        raise LmforgeError(f"run directory {run_dir} has no complete checkpoint yet")
    passed_over = []
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            if passed_over:
                log(f"warning: resuming from {folder.name}, the newest intact checkpoint")
            return folder
        log(f"warning: checkpoint {folder.name} is corrupt: {problem}")
        passed_over.append(folder)
        if set_aside:
            _set_aside(folder, log)
    raise LmforgeError(f"no intact checkpoint in {run_dir} ({len(passed_over)} corrupt); the run cannot be resumed")


def _set_aside(folder: Path, log) -> None:
    aside = folder.with_name(folder.name + ".corrupt")
    try:
        if not aside.exists():
            folder.rename(aside)
            log(f"warning: set {folder.name} aside as {aside.name}")
    except OSError:  # a read-only run directory: leave it where it is
        pass


# Errors that mean "this directory cannot be written now" (not a bug): a read-only directory or
# file system, a full disk or quota.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def run_dir_writes(run_dir: Path) -> Iterator[None]:
    """Turn a failed write into the run directory into one line naming the last good checkpoint.
    Checkpoints are staged and renamed (and `latest` switched) only when complete, so the one
    `latest` points at is intact whatever write failed."""
    run_dir = Path(run_dir)
    try:
        yield
    except OSError as e:
        paths = [Path(os.path.abspath(p)) for p in (e.filename, e.filename2) if isinstance(p, (str, os.PathLike))]
        inside = any(p == run_dir.absolute() or run_dir.absolute() in p.parents for p in paths)
        if e.errno not in _WRITE_ERRNOS or not inside:
            raise
        link = run_dir / "latest"
        last = f"the last good checkpoint is {run_dir / os.readlink(link)}" if link.is_symlink() \
            else "no checkpoint was written yet"
        raise LmforgeError(f"cannot write to run directory {run_dir} ({e.strerror}: {paths[0]}); {last}; "
                           "make it writable (or free space) and continue with --resume") from None
