"""Data parallelism applied *to* the model: DDP or FSDP2, under torchrun.

The model file never knows about this module. `setup()` reads torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group (NCCL on GPUs, gloo on CPU);
`parallelize()` wraps the model. Checkpoints (`lmforge.train.checkpoint`) are written
sharded, each rank its own part, and resharded on load, so any world size can resume
them (2 -> 1 -> 2); `full_model_state()` gathers the whole model only for the final
model directory.

A recipe's `train.batch_size` is the global batch: every rank draws the same batch
(the loader is seeded by the step) and keeps its own rows (`BatchShare`), so N processes
see exactly the data one process would, and their averaged gradients equal the
single-process ones. Fine-tuning wraps the model with its task head and loss
(`train.run.TaskStep`) in DDP and keeps whole, replicated checkpoints of what trains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.model import Transformer


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def dp_rank(self) -> int:
        """This process's place among the data-parallel groups (a layout that splits the model
        across processes puts several in one group)."""
        return self.rank

    @property
    def dp_world(self) -> int:
        return self.world

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch: its data-parallel group's share."""
        per = batch_size // self.dp_world
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)

    def all_true(self, flag: bool) -> bool:
        """True on every rank if any rank says so (e.g. a signal arrived on one of them)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def to_model_layout(self, state: Any, config: Any) -> Any:
        """Whole (gathered) model or optimizer state in the model's own layout. A layout that
        holds tensors reordered (tensor parallelism's context) puts them back; here they are."""
        return state

    def from_model_layout(self, state: Any, config: Any) -> Any:
        """Whole state in the model's own layout, as this layout holds it (see `to_model_layout`)."""
        return state

    def split(self, model: Transformer, device: torch.device, param_dtype: torch.dtype | None) -> Transformer:
        """The model split over the processes by a layout that splits matmuls (tensor parallelism)."""
        raise LmforgeError(f"train.parallel {self.strategy} does not split models; use tp or fsdp+tp")

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class BatchShare:
    """This process's part of each global batch: its rows (`DistContext.rows`), so that N processes
    together see the batch one process would. A loss averaged over the tokens of one's own rows
    (a masked language-model loss) is reweighted by `loss_weight`, N times the share of the
    batch's counted tokens those rows hold: DDP's average of the N weighted losses is then the
    average over the whole batch's tokens, as on one process. A loss averaged over rows needs
    no weight (every process has as many rows). On one process a batch is left as it is."""

    def __init__(self, ctx: DistContext | None = None):
        self.ctx = ctx or DistContext()

    def items(self, items: list) -> list:
        """This process's examples of a global batch's `items`."""
        return items[self.ctx.rows(len(items))] if self.ctx.active else items

    def rows(self, batch: dict[str, torch.Tensor], counted: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """This process's rows of every tensor of `batch`; with `counted` (a (rows, ...) mask of the
        entries the loss averages over), the `loss_weight` that `weighted` applies."""
        if not self.ctx.active:
            return batch
        mine = self.ctx.rows(next(iter(batch.values())).shape[0])
        out = {k: v[mine] for k, v in batch.items()}
        if counted is not None:
            total = int(counted.sum())
            out["loss_weight"] = torch.tensor(self.ctx.world * int(counted[mine].sum()) / max(total, 1))
        return out


def weighted(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`loss` times the batch's `loss_weight` (`BatchShare.rows`), when it has one."""
    return loss * batch["loss_weight"] if "loss_weight" in batch else loss


def setup(strategy: str, batch_size: int, device_name: str) -> tuple[DistContext, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(), single_device(device_name)
    if batch_size % world and strategy not in ("tp", "fsdp+tp"):  # those split it over the dp groups (checked there)
        raise LmforgeError(f"train.batch_size {batch_size} is not divisible by the {world} processes; "
                           f"use a multiple of {world}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank, "ddp" if strategy == "auto" else strategy), device


def single_device(device_name: str) -> torch.device:
    """The device train.device names for one process: `auto` is the GPU when one is visible."""
    if device_name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_name)


def teardown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_activations(model: Transformer) -> None:
    """Recompute each block's activations during backward instead of keeping them.

    Done by replacing each block's bound `forward`, so parameter names (and so
    checkpoints) stay the same; applied before any sharding, as FSDP2 expects."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = partial(checkpoint, type(block).forward, block, use_reentrant=False)


def parallelize(model: Transformer, ctx: DistContext, device: torch.device,
                param_dtype: torch.dtype | None = None, activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module the training step calls: the model itself, a DDP wrapper, or the model
    with each block (and then the whole) sharded by FSDP2."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if not ctx.active or ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        return data_parallel(model, device)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kwargs = {"mp_policy": mp} if mp else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if ctx.strategy in ("tp", "fsdp+tp"):
        return ctx.split(model, device, param_dtype)
    raise LmforgeError(f"train.parallel {ctx.strategy} is not available yet; use auto, ddp or fsdp")


def data_parallel(module: torch.nn.Module, device: torch.device, partly_used: bool = False,
                  sync_buffers: bool = True) -> torch.nn.Module:
    """`module` under DDP. Only parameters that take gradients are in its all-reduce buckets (a LoRA
    run's frozen base is not). `partly_used`: some trainable parameters may get no gradient in a
    step (a task head's backbone skips the language-model head). Without `sync_buffers`, rank 0's
    buffers are copied once, not before every forward (a QLoRA base keeps its integer weights in
    buffers, which never change)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from lmforge.model.moe import MoE

    # a mixture-of-experts layer's experts that no token of a step chose get no gradient in it
    partly_used = partly_used or any(isinstance(m, MoE) for m in module.modules())

    # forward_sync_buffers is what newer PyTorch calls broadcast_buffers (which it deprecates)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=partly_used, **{sync: sync_buffers})


def no_gradient_sync(wrapped: torch.nn.Module, ctx: DistContext, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if not ctx.active or last_micro_step:
        return contextlib.nullcontext()
    if ctx.strategy == "ddp":
        return wrapped.no_sync()
    if ctx.strategy in ("fsdp", "fsdp+tp") and hasattr(wrapped, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def full_state(model: Transformer, optimizer: torch.optim.Optimizer, ctx: DistContext) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (collective under FSDP; on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.active)
    return full_model_state(model, ctx), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model: Transformer, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded model state dict, on CPU; under FSDP a collective that leaves it on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=ctx.active))
    return ctx.to_model_layout(state, model.config)


def load_full_state(model: Transformer, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict, ctx: DistContext) -> None:
    """Load unsharded state into a (possibly sharded) model and optimizer: any world size."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model_state, optim_state = (ctx.from_model_layout(s, model.config) for s in (model_state, optim_state))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def launch(nproc: int, argv: list[str], signal_ranks: bool = False) -> int:
    """Re-run `lmforge <argv>` under torchrun with `nproc` local processes.

    torchrun runs in a session of its own, so Ctrl-C and SIGTERM reach it once, from here, and
    this process waits for it to stop its ranks instead of dying first. With `signal_ranks`, the
    first such signal goes to the ranks themselves instead (their command stops them in order,
    rank 0 telling the others, and all exit cleanly; torchrun, signalled, would report a failure);
    a second one goes to torchrun."""
    if nproc < 1:
        raise LmforgeError("--nproc must be at least 1")
    cmd = [sys.executable, "-m", "lmforge.train.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmforge", *argv]
    child = subprocess.Popen(cmd, start_new_session=True)
    signalled = []

    def forward(signum, frame) -> None:
        ranks = child_processes(child.pid) if signal_ranks and not signalled else []
        signalled.append(signum)
        for pid in ranks or [child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc; none elsewhere)."""
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less option `name` and its value (`--nproc 2` or `--nproc=2`): a command's own
    arguments to re-run under torchrun."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def plain_copy(model_state: dict[str, Any], like: Transformer) -> Transformer:
    """A plain (unwrapped, unsharded) model holding `model_state`, for writing a model directory."""
    with torch.device("meta"):
        copy = Transformer(like.config)
    copy.load_state_dict(model_state, assign=True)
    if like.config.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    copy.init_rope()
    return copy
