"""Checkpoints in the run directory: a model directory plus `trainer.pt` per step.

    runs/<name>/checkpoints/step-000500/   model-directory files + trainer.pt
    runs/<name>/latest -> checkpoints/step-000500

A checkpoint is written under a temporary name and renamed when complete; `latest` is
switched (atomically, by renaming a new link over it) only after that. `trainer.pt` holds
optimizer state, RNG state and the data cursor, and is read with `weights_only=True`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import to_hf_config
from lmforge.model import Transformer
from lmforge.model_dir import atomic_directory, load_model_dir, write_model_files

TRAINER_STATE = "trainer.pt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model: Transformer, tokenizer: TextTokenizer,
                    trainer_state: dict[str, Any], provenance: dict[str, Any], keep: int) -> Path:
    folder = run_dir / "checkpoints" / checkpoint_name(step)
    with atomic_directory(folder) as d:
        write_model_files(d, model, tokenizer, provenance)
        torch.save(trainer_state, d / TRAINER_STATE)
    commit_checkpoint(run_dir, folder, keep)
    return folder


def commit_checkpoint(run_dir: Path, folder: Path, keep: int) -> None:
    """Point `latest` at a complete checkpoint (by renaming a new link over the old one),
    then delete all but the newest `keep` checkpoints."""
    link = run_dir / "latest"
    tmp = run_dir / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path("checkpoints") / folder.name, tmp)
    os.replace(tmp, link)
    _prune(run_dir / "checkpoints", keep, current=folder.name)


def _prune(folder: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = run_dir / "latest"
    if not link.exists():
        return None
    return link.resolve()


def load_checkpoint(folder: Path, config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, trainer state) of a checkpoint made for a model of `config`."""
    loaded, _, _ = load_model_dir(folder)
    if to_hf_config(loaded.config) != to_hf_config(config):
        raise LmforgeError(f"checkpoint {folder} is of a different model than the recipe describes; "
                           "resume with the run's own recipe.yaml")
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise LmforgeError(f"{path} is missing: the checkpoint is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise LmforgeError(f"{path} is corrupt ({type(e).__name__}); resume from an earlier checkpoint") from None
    return loaded.state_dict(), state
