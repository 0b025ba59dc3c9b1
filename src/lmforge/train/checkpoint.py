"""Checkpoints in the run directory, and the model directory made from one.

Pretraining (`ModelCheckpoints`) writes whole models, in one of two layouts:

    runs/<name>/checkpoints/step-000500/   one process: a model directory + trainer.pt
    runs/<name>/checkpoints/step-000500/   several: config and tokenizer files, lmforge.json,
                                           trainer.pt, dcp/ (.metadata + one __R_0.distcp per rank)
    runs/<name>/latest -> checkpoints/step-000500

A one-process checkpoint is itself a model directory (anything that loads a model loads it);
`trainer.pt` adds optimizer state, RNG state and the data cursor (the step). Several
processes write with `torch.distributed.checkpoint` (DCP): each rank writes its own shards
of the model and optimizer state (an FSDP2 shard, under DDP its share of the replicated
tensors, in a pipeline its stage's tensors under their full-model names, with the optimizer
state flattened per parameter name, `pipeline_parallel.stage_state`), and nothing is gathered;
`trainer.pt` then holds only the RNG and the step.
Loading reads either layout at any world size: DCP reshards to the ranks (and the FSDP or
DDP layout) that load it, and a one-process checkpoint is loaded whole and then sharded.
`export_checkpoint` turns either into a model directory.

A checkpoint is written under a temporary name (DCP: rank 0 makes it and every rank writes
into it) and renamed once every rank's part is written; `latest` is switched (atomically, by
renaming a new link over it) only after that. Every checkpoint records the sha256 of its files
(`checksums.sha256`, see `train.recovery`), checked before a run resumes from it. `best` points
at the checkpoint of the lowest validation loss when early stopping is on; pruning keeps it.
`trainer.pt` is read with `weights_only=True`.

Fine-tuning and distillation (`TrainableCheckpoints`) write only what trains, beside the same
`trainer.pt` and checksums: `checkpoints/step-000100/trainable.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import from_hf_config, to_hf_config
from lmforge.model import Transformer
from lmforge.model_dir import (atomic_directory, load_model_dir, load_tokenizer, read_json, save_model_dir,
                               write_config_files, write_model_files)
from lmforge.train import distributed, pipeline_parallel
from lmforge.train.distributed import DistContext
from lmforge.train.recovery import (TRAINER_STATE, checkpoint_folders, checkpoint_name, find_checkpoint,
                                    save_trainer_state, write_checksums)

SHARDS = "dcp"  # the DCP folder of a checkpoint written by several processes
PROVENANCE = "lmforge.json"
# What write_model_files derives from the weights; the rest of lmforge.json is provenance.
_DERIVED_KEYS = ("lmforge_version", "created", "model", "parameters", "quantization", "weights")


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    tokenizer: TextTokenizer, trainer_state: dict[str, Any], provenance: dict[str, Any],
                    keep: int, ctx: DistContext) -> Path:
    """Write the checkpoint of `step` (collective when several processes train), make it
    `latest` and prune old ones. `trainer_state` is rank 0's (step, RNG, ...)."""
    folder = run_dir / "checkpoints" / checkpoint_name(step)
    if ctx.active:
        _save_sharded(folder, model, optimizer, tokenizer, trainer_state, provenance, ctx)
    else:
        weights, optim = distributed.full_state(model, optimizer, ctx)
        with atomic_directory(folder) as d:
            write_model_files(d, distributed.plain_copy(weights, model), tokenizer, provenance)
            save_trainer_state({**trainer_state, "optimizer": optim}, d / TRAINER_STATE)
            write_checksums(d)
    if ctx.is_main:
        commit_checkpoint(run_dir, folder, keep)
    ctx.barrier()  # no rank goes on (or exits) before the checkpoint is complete and `latest`
    return folder


def _save_sharded(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer, tokenizer: TextTokenizer,
                  trainer_state: dict[str, Any], provenance: dict[str, Any], ctx: DistContext) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    staging_cm = atomic_directory(folder) if ctx.is_main else contextlib.nullcontext()
    with staging_cm as staging:
        staging = Path(ctx.share(str(staging) if ctx.is_main else None))
        if _pipelined(ctx):
            model_state, optim_state = pipeline_parallel.stage_state(model, optimizer)
        else:
            model_state, optim_state = get_state_dict(model, optimizer)  # this rank's shards (DTensors under FSDP)
            model_state.pop(_tied_alias(model), None)
        # Returns on every rank only once all ranks' files and rank 0's .metadata are written.
        dcp.save(_in_model_layout({"model": model_state, "optimizer": optim_state}, model, ctx),
                 storage_writer=dcp.FileSystemWriter(staging / SHARDS))
        if ctx.is_main:
            cfg = model.config
            dtype = next(iter(model_state.values())).dtype
            write_config_files(staging, to_hf_config(cfg, tokenizer.special_ids(), dtype), tokenizer, cfg.context)
            meta = {"model": cfg.model_dump(mode="json"), **provenance,
                    "checkpoint": {"format": "dcp", "world": ctx.world, "parallel": ctx.strategy,
                                   "step": trainer_state["step"]}}
            (staging / PROVENANCE).write_text(json.dumps(meta, indent=2, default=str))
            save_trainer_state(trainer_state, staging / TRAINER_STATE)
            write_checksums(staging)  # every rank's shards are written by now (dcp.save returned)
    # rank 0 left the block by renaming the staging folder to `folder`


def commit_checkpoint(run_dir: Path, folder: Path, keep: int) -> None:
    """Point `latest` at a complete checkpoint (by renaming a new link over the old one),
    then delete all but the newest `keep` checkpoints."""
    point_link(run_dir, "latest", folder)
    _prune(run_dir, keep, current=folder.name)
    # Saves are collective and one at a time, so once one commits, any staging folder still here
    # belongs to a save that died (rank 0 killed mid-write): nothing will ever rename it.
    for stale in (run_dir / "checkpoints").glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def point_link(run_dir: Path, name: str, folder: Path) -> None:
    """Make `run_dir/name` (latest, best) a relative link to checkpoint `folder`, atomically."""
    link = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path("checkpoints") / folder.name, tmp)
    os.replace(tmp, link)


def _prune(run_dir: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    best = run_dir / "best"
    protected = {current, os.readlink(best).split("/")[-1] if best.is_symlink() else None}
    for old in checkpoint_folders(run_dir)[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = run_dir / "latest"
    if not link.exists():
        return None
    return link.resolve()


def is_sharded(folder: Path) -> bool:
    return (folder / SHARDS).is_dir()


def load_checkpoint(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                    ctx: DistContext) -> dict[str, Any]:
    """Load a checkpoint of either layout into `model` and `optimizer` (as parallelized for
    this world size; collective when several processes train) and return its trainer state."""
    _check_same_model(folder, model.config)
    state = _trainer_state(folder)
    if is_sharded(folder):
        _load_sharded(folder, model, optimizer, ctx,
                      advice="resume with the run's own recipe.yaml, or from an earlier checkpoint")
    else:
        if "optimizer" not in state:
            raise LmforgeError(f"{folder / TRAINER_STATE} holds no optimizer state: the checkpoint is incomplete")
        loaded, _, _ = load_model_dir(folder)
        if _pipelined(ctx):
            pipeline_parallel.load_full_stage(model, optimizer, loaded.state_dict(), state.pop("optimizer"))
        else:
            distributed.load_full_state(model, optimizer, loaded.state_dict(), state.pop("optimizer"), ctx)
    return state


def _check_same_model(folder: Path, config: ModelConfig) -> None:
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{folder} has no config.json: not a pretraining checkpoint, or an incomplete one")
    if to_hf_config(from_hf_config(read_json(folder / "config.json"))) != to_hf_config(config):
        raise LmforgeError(f"checkpoint {folder} is of a different model than the recipe describes; "
                           "resume with the run's own recipe.yaml")


def _trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise LmforgeError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise LmforgeError(f"{path} is corrupt ({type(e).__name__}); resume from an earlier checkpoint") from None


def _load_sharded(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                  ctx: DistContext, advice: str) -> None:
    """DCP load into this rank's part of `model` (and `optimizer`): only the data it holds is read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    shards = folder / SHARDS
    if not (shards / ".metadata").is_file():
        raise LmforgeError(f"{shards / '.metadata'} is missing: the checkpoint is incomplete")
    if _pipelined(ctx):
        pipeline_parallel.load_stage(model, optimizer, lambda request: _dcp_load(request, shards, ctx, advice))
        return
    optimizers = [optimizer] if optimizer is not None else []
    # A pipeline stage writes its optimizer state flattened (per parameter name); read it so.
    options = StateDictOptions(flatten_optimizer_state_dict=_flattened(shards))
    # The optimizer's state is created (a zero-lr step) so that DCP has tensors to load into.
    model_state, optim_state = get_state_dict(model, optimizers, options=options)
    alias = _tied_alias(model)
    wanted = {k: v for k, v in model_state.items() if k != alias}  # the tied head is the embedding: not read twice
    request = {"model": wanted, **({"optimizer": optim_state} if optimizer is not None else {})}
    _dcp_load(_in_model_layout(request, model, ctx), shards, ctx, advice)
    if alias in model_state:
        wanted[alias] = wanted["tok_emb.weight"]
    set_state_dict(model, optimizers, model_state_dict=wanted, optim_state_dict=optim_state, options=options)


def _pipelined(ctx: DistContext) -> bool:
    return ctx.active and ctx.strategy in pipeline_parallel.LAYOUTS


def _flattened(shards: Path) -> bool:
    """Whether a DCP checkpoint holds its optimizer's settings per parameter name
    (`optimizer.param_groups.<name>.lr`, as pipeline stages write them) rather than per group."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(shards).read_metadata().state_dict_metadata
    except Exception:  # unreadable: the load reports it
        return False
    groups = [k for k in keys if k.startswith("optimizer.param_groups.")]
    return bool(groups) and not any(k.split(".")[2].isdigit() for k in groups)


def _in_model_layout(state: dict[str, Any], model: Transformer, ctx: DistContext) -> dict[str, Any]:
    """`state` as DCP writes and reads it: under tensor parallelism the fused projections' rows at
    their places in the model's own layout (`tensor_parallel.checkpoint_view`), so that every
    layout writes the same checkpoint."""
    from lmforge.train import tensor_parallel

    tp = tensor_parallel.tp_size_of(ctx)
    return tensor_parallel.checkpoint_view(state, model.config, tp) if tp > 1 else state


def _tied_alias(model: Transformer) -> str | None:
    """The state-dict name of the output layer when it is the embedding matrix itself: DCP
    would write that tensor once under each name (for GPT-2 small, 154 MB more per checkpoint)."""
    return "lm_head.weight" if model.config.tie_embeddings else None


def _dcp_load(request: dict[str, Any], shards: Path, ctx: DistContext, advice: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(request, storage_reader=dcp.FileSystemReader(shards), no_dist=not ctx.active)
    except (Exception, CheckpointException) as e:  # CheckpointException (any rank failed) is a BaseException
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0].split(". ")[0][:200]
        raise LmforgeError(f"checkpoint {shards.parent} does not fit this model or is corrupt ({reason}); "
                           f"{advice}") from None


def resolve_checkpoint(path: Path, log=print) -> Path:
    """A checkpoint folder, or a run directory (its newest intact checkpoint)."""
    if not path.is_dir():
        raise LmforgeError(f"checkpoint {path} not found")
    if (path / "latest").is_symlink() or (path / "checkpoints").is_dir():
        return find_checkpoint(path, log=log)
    return path


def export_checkpoint(checkpoint: Path, out: Path, log=print) -> Path:
    """Write the model of a checkpoint (either layout) as a model directory: config.json,
    model.safetensors with Hugging Face names, tokenizer, lmforge.json. One process; a
    sharded checkpoint is read whatever the number of processes that wrote it."""
    folder = resolve_checkpoint(checkpoint, log)
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{folder} has no config.json: not a pretraining checkpoint (fine-tuning checkpoints "
                           "hold only what trains; their run writes model/ or adapter/ at the end)")
    meta = read_json(folder / PROVENANCE) if (folder / PROVENANCE).is_file() else {}
    if is_sharded(folder):
        model = Transformer(from_hf_config(read_json(folder / "config.json")))
        _load_sharded(folder, model, None, DistContext(), advice="export an earlier checkpoint")
        tokenizer = load_tokenizer(folder)
    else:
        model, tokenizer, _ = load_model_dir(folder)
    provenance = {k: v for k, v in meta.items() if k not in _DERIVED_KEYS}
    provenance["parents"] = [str(folder)]
    return save_model_dir(model, tokenizer, out, provenance)


class ModelCheckpoints:
    """A run's checkpoints as model directories (pretraining): see `save_checkpoint`, `load_checkpoint`."""

    def __init__(self, run_dir: Path, model: Transformer, tokenizer: TextTokenizer, provenance: dict[str, Any],
                 keep: int, ctx: DistContext):
        self.run_dir, self.model, self.tokenizer, self.provenance, self.keep, self.ctx = \
            run_dir, model, tokenizer, provenance, keep, ctx

    def save(self, step: int, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.run_dir, step, self.model, optimizer, self.tokenizer, state, self.provenance,
                               self.keep, self.ctx)

    def load(self, folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return load_checkpoint(folder, self.model, optimizer, self.ctx)


TRAINABLE = "trainable.safetensors"


class TrainableCheckpoints:
    """A run's checkpoints as only what trains (fine-tuning): the tensors that take gradients (all of
    a full fine-tune, LoRA's for an adapter) and the task head, in `trainable.safetensors`, beside
    `trainer.pt` and `checksums.sha256`. Under DDP every process holds the same tensors and optimizer
    state, so rank 0 writes the checkpoint as one process would, and every process reads it whole:
    a checkpoint resumes at any number of processes."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, head: torch.nn.Module | None, keep: int,
                 ctx: DistContext | None = None):
        self.run_dir, self.model, self.head, self.keep = run_dir, model, head, keep
        self.ctx = ctx or DistContext()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.head is not None:
            out.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return out

    def save(self, step: int, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        folder = self.run_dir / "checkpoints" / checkpoint_name(step)
        if self.ctx.is_main:
            with atomic_directory(folder) as d:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}, str(d / TRAINABLE))
                save_trainer_state({**state, "optimizer": optimizer.state_dict()}, d / TRAINER_STATE)
                write_checksums(d)
            commit_checkpoint(self.run_dir, folder, self.keep)
        self.ctx.barrier()  # no rank goes on (or exits) before the checkpoint is complete and `latest`
        return folder

    def load(self, folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from safetensors.torch import load_file

        for name in (TRAINABLE, TRAINER_STATE):
            if not (folder / name).is_file():
                raise LmforgeError(f"{folder / name} is missing: the checkpoint is incomplete")
        saved = load_file(str(folder / TRAINABLE))
        current = self.tensors()
        if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
            raise LmforgeError(f"checkpoint {folder} does not match this run's model ({len(saved)} tensors saved, "
                               f"{len(current)} trainable now); resume with the run's own recipe.yaml")
        with torch.no_grad():
            for k, p in current.items():
                p.copy_(saved[k])
        try:
            state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise LmforgeError(f"{folder / TRAINER_STATE} is corrupt ({type(e).__name__})") from None
        optimizer.load_state_dict(state["optimizer"])
        return state
