"""Pipeline parallelism applied *to* the model: `train.parallel: pp` and `fsdp+pp`, under torchrun.

The model file never knows about this module. The processes form a (pp x dp) grid, rank
`stage * dp + dp_index`: `pp` is one pipeline of every process (dp = 1), `fsdp+pp` has
`dp = world / pp_size` pipelines side by side, each stage sharded by FSDP2 over its dp group.
A stage's processes are consecutive ranks, so under torchrun's node-by-node numbering a stage
shards within a node and only activations cross between nodes.

Each process makes only its stage's parameters (`build_stage_model`: the model built on the
meta device, then every parameter's initial values drawn in order, so that its weights are the
ones one process draws) and keeps only its stage (`keep_stages`), split by layer count: stage 0
the embeddings and the first blocks, the last stage the last blocks, the final norm and the
output layer. What it keeps keeps its full-model name (`blocks.5.attn.qkv.weight`), so
its optimizer and checkpoint (DCP, each stage its own tensors) are named as one process's
and a checkpoint written under any layout loads under any other.

A step runs one `torch.distributed.pipelining` schedule (GPipe, 1F1B, or interleaved 1F1B, where
each process runs two stages, p and p + pp_size, to shrink the pipeline's idle bubble) over the
pipeline's rows of the global batch, split into `train.pp_microbatches` microbatches. The loss of a
microbatch is its summed cross-entropy over the number of tokens of the pipeline's rows, so the
microbatch losses add up to the rows' mean, as the plain loop computes it, and the gradients
to its gradients (FSDP then averages over the dp groups, as DDP does). With tied embeddings the
last stage holds its own copy of the embedding matrix as the output layer; the two copies'
gradients are summed before the optimizer step, so they stay equal. Gradient clipping uses
the norm of all stages' gradients together. Validation runs the stages forward only, one
batch at a time (hidden states sent from stage to stage), on the same windows as one process
(every pipeline scores them all: FSDP's gathers need every dp process in each forward).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.loader import sequential_windows
from lmforge.data.sft import IGNORE
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import EvalResult
from lmforge.model import Transformer
from lmforge.model.transformer import soft_cap
from lmforge.train.distributed import DistContext
from lmforge.train.losses import chunked_cross_entropy

LAYOUTS = ("pp", "fsdp+pp")
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


@dataclass
class PipelineContext(DistContext):
    """A `DistContext` whose processes form a (pp x dp) grid: each pipeline (dp index) trains
    on its rows of the global batch, and every stage of it draws the same rows."""

    pp_size: int = 1
    microbatches: int = 1

    @property
    def stage(self) -> int:
        return self.rank // self.dp_world

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_world

    @property
    def dp_world(self) -> int:
        return self.world // self.pp_size


def pipeline_context(ctx: DistContext, tc: TrainConfig) -> DistContext:
    """`ctx` as a (dp x pp) grid for train.parallel pp / fsdp+pp, after checking that the
    processes, the batch and the microbatches divide as the layout needs."""
    if not ctx.active:
        return ctx
    if tc.compile and tc.parallel != "pp":
        raise LmforgeError("train.compile compiles pipeline stages under train.parallel pp only, not "
                           f"{tc.parallel}; use --train.compile false")
    if tc.pp_schedule == "interleaved" and tc.parallel != "pp":
        raise LmforgeError(f"train.pp_schedule interleaved runs under train.parallel pp only; use 1f1b or gpipe "
                           f"with {tc.parallel}")
    pp = tc.pp_size or (ctx.world if tc.parallel == "pp" else 2)
    if tc.parallel == "pp" and pp != ctx.world:
        raise LmforgeError(f"train.parallel pp makes one pipeline of all {ctx.world} processes, but train.pp_size "
                           f"is {pp}; leave pp_size 0, or use --train.parallel fsdp+pp for several pipelines")
    if pp < 2 or ctx.world % pp:
        raise LmforgeError(f"train.pp_size {pp} does not divide the {ctx.world} processes into pipelines of "
                           "2 stages or more; use a divisor of the process count")
    dp = ctx.world // pp
    micro = tc.pp_microbatches or 2 * pp
    if tc.batch_size % (dp * micro):
        raise LmforgeError(f"train.batch_size {tc.batch_size} does not split into {dp} pipeline(s) x {micro} "
                           f"microbatches; use a multiple of {dp * micro} (or set train.pp_microbatches)")
    rounds = max(1, micro // pp)
    if tc.pp_schedule == "interleaved" and micro % rounds:
        raise LmforgeError(f"train.pp_microbatches {micro} does not suit the interleaved schedule on {pp} stages: "
                           f"use a multiple of {pp}, or fewer than {2 * pp}")
    return PipelineContext(ctx.rank, ctx.world, ctx.local_rank, ctx.strategy, pp_size=pp, microbatches=micro)


def stage_layers(n_layer: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: `n_layer` split as evenly as it goes, the first stages one more."""
    per, extra = divmod(n_layer, stages)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


def process_stages(tc: TrainConfig, ctx: PipelineContext) -> tuple[list[int], int]:
    """(the stages this process runs, the pipeline's stage count): process p runs stages p,
    p + pp_size, ... (the schedules' "loop" placement; two per process under interleaved)."""
    per_process = 2 if tc.pp_schedule == "interleaved" else 1
    return [ctx.stage + k * ctx.pp_size for k in range(per_process)], ctx.pp_size * per_process


def stage_parameter(name: str, n_layer: int, stages: list[int], n_stages: int) -> bool:
    """True when parameter `name` (a full-model name) belongs to one of `stages`."""
    if name.startswith("blocks."):
        index = int(name.split(".", 2)[1])
        return any(index in stage_layers(n_layer, n_stages, s) for s in stages)
    if name.startswith(("tok_emb.", "pos_emb.")):
        return 0 in stages
    return n_stages - 1 in stages  # the final norm and the output layer


# The in-place random initialisations of torch's modules (nn.init.* calls these).
_DRAWS = ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_")


class _DrawOnScratch(TorchDispatchMode):
    """Repeats every in-place random draw on a meta tensor on a CPU scratch tensor of its shape
    and dtype, then drops it: building modules on the meta device then advances the default
    generator exactly as building them for real does, at the cost of one tensor at a time."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if func.overloadpacket.__name__ in _DRAWS and isinstance(target, torch.Tensor) and target.is_meta:
            func(torch.empty(target.shape, dtype=target.dtype, device="cpu"), *args[1:], **kwargs)
        return func(*args, **kwargs)


def build_stage_model(cfg: ModelConfig, tc: TrainConfig, ctx: PipelineContext, device: torch.device) -> Transformer:
    """`Transformer(cfg)` as this process's stages need it, with the initial weights one process
    draws from the same random state, without ever holding the whole model: built on the meta
    device (the modules' own draws repeated on scratch tensors), then this process's parameters
    made on `device` and `reset_parameters` run over every parameter in order, so each draw
    lands where one process's would (draws for the other stages' meta parameters are dropped).
    The generator ends where one process's build leaves it. `keep_stages` then drops the rest."""
    stages, n_stages = process_stages(tc, ctx)
    with torch.device("meta"), _DrawOnScratch():
        model = Transformer(cfg)
    model.init_rope()  # on the CPU, as one process computes the tables before moving them
    for name, table in list(model.named_buffers(recurse=False)):
        setattr(model, name, table.to(device))
    # a tied parameter is made once, under all its names, when any of them is this process's
    mine = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
            if stage_parameter(name, cfg.n_layer, stages, n_stages)}
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in mine:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                setattr(module, name, made[id(param)])
    model.reset_parameters()
    return model


def keep_stages(model: Transformer, stages: list[int], n_stages: int) -> list[nn.Module]:
    """Reduce `model`, in place, to what its `stages` (of `n_stages`) compute, names unchanged, and
    return one module per stage mapping its input (token ids on stage 0, else hidden states) to
    its output (hidden states; on the last stage the final normalized ones). With one stage that
    module is `model` itself, whose own `forward` becomes the stage's."""
    layers = [stage_layers(model.config.n_layer, n_stages, s) for s in stages]
    model.blocks = nn.ModuleDict({str(i): model.blocks[i] for part in layers for i in part})
    if 0 not in stages:
        model.tok_emb = None
        model.pos_emb = None
    if n_stages - 1 not in stages:
        model.norm_f = None
        model.lm_head = None
    # A dropped block whose forward is activation checkpointing's (a partial bound to the block)
    # is a reference cycle: collect it now, not at some later garbage collection
    gc.collect()
    runs = [_StageForward(model, part, s == 0, s == n_stages - 1) for s, part in zip(stages, layers)]
    if len(runs) == 1:
        model.forward = runs[0]  # the instance's own forward: the class's stays the whole model's
        return [model]
    return [_Chunk(model, run) for run in runs]


class _StageForward:
    """The forward of one stage of a stage-reduced model (not a module: the model owns the parameters)."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        self.model, self.layers, self.first, self.last = model, layers, first, last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.first:
            x = m.drop(m.embed(x))
        T = x.shape[1]
        for i in self.layers:
            rope, mask, is_causal = m.layer_inputs(i, T, x.dtype, x.device)
            x = m.blocks[str(i)](x, rope, None, i, mask, is_causal)
        return m.norm_f(x) if self.last else x


class _Chunk(nn.Module):
    """One of several stages a process runs (interleaved schedules): its blocks, and its forward."""

    def __init__(self, model: Transformer, run: _StageForward):
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in run.layers})
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def tied_copy(model: Transformer) -> bool:
    """True on a pipeline's last stage whose output layer is its own copy of the (tied) embedding."""
    return model.config.tie_embeddings and model.lm_head is not None and model.tok_emb is None


class Pipeline:
    """This process's stage of the pipeline and its schedule: what the loop calls instead of the
    model's forward and backward (`train_step`), for clipping (`clip_gradients`), validation
    (`evaluate`) and the final model (`full_model_state`)."""

    def __init__(self, model: Transformer, tc: TrainConfig, ctx: PipelineContext, device: torch.device):
        from torch.distributed import pipelining
        from torch.distributed.device_mesh import init_device_mesh

        n_layer = model.config.n_layer
        self.stages, self.n_stages = process_stages(tc, ctx)
        per_process = len(self.stages)
        if n_layer < self.n_stages:
            raise LmforgeError(f"model.n_layer {n_layer} is fewer than the {self.n_stages} pipeline stages "
                               f"({ctx.pp_size} processes x {per_process}); use fewer stages or a deeper model")
        self.model, self.tc, self.ctx, self.device = model, tc, ctx, device
        mesh = init_device_mesh(device.type, (ctx.pp_size, ctx.dp_world), mesh_dim_names=("pp", "dp"))
        self.first, self.last = 0 in self.stages, self.n_stages - 1 in self.stages
        self.parts = keep_stages(model, self.stages, self.n_stages)
        self.tied = model.config.tie_embeddings
        # One group per pipeline joins its first and last stage, whose embedding copies are summed.
        self.tie_group = None
        if self.tied:
            for d in range(ctx.dp_world):
                group = dist.new_group([d, (ctx.pp_size - 1) * ctx.dp_world + d])
                if d == ctx.dp_rank:
                    self.tie_group = group
        if ctx.strategy == "fsdp+pp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks.values():
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        self.pp_group = mesh["pp"].get_group()
        # train.compile: the schedule runs each stage compiled (validation runs them as they are)
        runs = [torch.compile(part) for part in self.parts] if tc.compile else self.parts
        stages = [pipelining.PipelineStage(part, s, self.n_stages, device, group=self.pp_group)
                  for part, s in zip(runs, self.stages)]
        schedule = getattr(pipelining, SCHEDULES[tc.pp_schedule])
        self.schedule = schedule(stages if per_process > 1 else stages[0], ctx.microbatches, loss_fn=self._loss,
                                 scale_grads=False)
        self._per_token = 1.0

    def _summed_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of the last stage's hidden states, summed over the counted targets:
        through `lm_head` in chunks with train.loss_chunk, as the plain loop's loss."""
        head, chunk = self.model.lm_head, self.tc.loss_chunk
        if chunk and getattr(head, "soft_cap", None) is None:
            return chunked_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(), chunk,
                                         reduction="sum")
        logits = soft_cap(head(hidden), self.model.config.logit_softcap)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A microbatch's loss: its summed cross-entropy times `_per_token` (1 / the step's counted tokens)."""
        return self._summed_loss(hidden, targets) * self._per_token

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], accumulation: int = 1) -> float:
        """Forward and backward of this pipeline's rows `batch` (the gradients of their mean loss,
        over `accumulation`, added to the parameters'); the mean loss over the whole global batch,
        on every process."""
        x, y = batch
        self._per_token = 1.0 / (max(int((y != IGNORE).sum()), 1) * accumulation)
        losses: list[torch.Tensor] = []
        if self.first:  # a pipeline has 2 stages or more: never first and last both
            self.schedule.step(x, return_outputs=False)
        elif self.last:
            self.schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        mine = float(sum(loss.detach().float().item() for loss in losses)) * accumulation if self.last else 0.0
        # The last stages hold the loss; the mean over the pipelines, on every process.
        total = torch.tensor([mine], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.ctx.dp_world

    def clip_gradients(self, max_norm: float) -> float:
        """Sum the tied embedding copies' gradients, then clip all stages' gradients together to
        `max_norm` (their global norm); returns that norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.tied and self.tie_group is not None and (self.first or self.last):
            weight = self.model.tok_emb.weight if self.first else self.model.lm_head.weight
            grad = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
            dist.all_reduce(grad, group=self.tie_group)
        # The last stage's copy of the embedding is counted once, on stage 0.
        counted = [p for p in params if not (tied_copy(self.model) and p is self.model.lm_head.weight)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in counted])
        if hasattr(norm, "full_tensor"):  # FSDP: the norm of this rank's shards, completed over dp
            norm = norm.full_tensor()
        squared = norm.detach().double().pow(2)
        dist.all_reduce(squared, group=self.pp_group)
        total = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(norm.dtype))
        return float(total.item())

    def _rank_of(self, stage: int) -> int:
        """The process of this pipeline that runs `stage`."""
        return (stage % self.ctx.pp_size) * self.ctx.dp_world + self.ctx.dp_rank

    def evaluate(self, task: Any) -> EvalResult:
        """Perplexity on the task's validation windows (those one process scores), each batch run
        through the stages forward only; the result on every process."""
        model, cfg = self.model, self.model.config
        split = task.val
        seq_len = min(task.seq_len, split.tokens - 1)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in sequential_windows(split, seq_len, task.batch_size, task.eval_batches):
                x, y = x.to(self.device), y.to(self.device)
                for stage, part in zip(self.stages, self.parts):
                    if stage == 0:
                        h = x
                    else:
                        h = torch.empty((*x.shape, cfg.d_model), dtype=dtype, device=self.device)
                        dist.recv(h, src=self._rank_of(stage - 1))
                    h = part(h)
                    if stage < self.n_stages - 1:
                        dist.send(h.to(dtype).contiguous(), dst=self._rank_of(stage + 1))
                if not self.last:
                    continue
                total += self._summed_loss(h, y).item()
                count += int((y != IGNORE).sum())
        # Pipeline 0's last stage scored every window; every process gets its sums.
        sums = torch.tensor([total, count] if self.last and self.ctx.dp_rank == 0 else [0.0, 0.0],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return EvalResult.of(sums[0].item(), int(sums[1].item()), split.bytes_per_token)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict, on CPU, on rank 0 (empty elsewhere): every stage's
        (gathered over dp under FSDP) sent to rank 0. A collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        mine = {k: v.detach().cpu() for k, v in state.items()} if self.ctx.dp_rank == 0 else {}
        parts: list[Any] = [None] * self.ctx.world if self.ctx.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.ctx.is_main:
            return {}
        whole: dict[str, torch.Tensor] = {}
        for part in parts:
            whole.update(part)
        return whole


# ----------------------------------------------------------------------------- checkpoints
# A stage writes its tensors under their full-model names, its optimizer state flattened per
# parameter (`state.<name>.exp_avg`, `param_groups.<name>.lr`): the stages' parts then add up to
# the state one process would write (DCP keeps each key once), and any layout reads it.


def _flat():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _saved_name(model: Transformer, name: str) -> str:
    """The name `name` of this stage's state has in a checkpoint: a last stage's copy of the tied
    embedding is the embedding."""
    return "tok_emb.weight" if name == "lm_head.weight" and tied_copy(model) else name


def _parameter_of(key: str) -> str | None:
    """The parameter a flattened optimizer key belongs to: `state.<name>.<field>`."""
    return key[len("state."):].rsplit(".", 1)[0] if key.startswith("state.") else None


def stage_state(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This stage's model and optimizer state as its part of a checkpoint (a last stage's copy of
    a tied embedding is left to stage 0, which holds the same values)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_flat())
    if tied_copy(model):
        model_state.pop("lm_head.weight")
        optim_state = {k: v for k, v in optim_state.items() if ".lm_head.weight." not in f".{k}"}
    return model_state, optim_state


def load_stage(model: Transformer, optimizer: torch.optim.Optimizer | None, dcp_load) -> None:
    """Read this stage's part of a sharded checkpoint of any layout with `dcp_load(request)`:
    its tensors and its parameters' optimizer state (the optimizer's settings stay the recipe's;
    the loop sets the learning rate at every step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers, options=_flat())
    request: dict[str, Any] = {"model": {_saved_name(model, k): v for k, v in model_state.items()}}
    if optimizer is not None:
        request["optimizer"] = {f"state.{_saved_name(model, name)}.{k.rsplit('.', 1)[1]}": v
                                for k, v in optim_state.items() if (name := _parameter_of(k)) is not None}
    dcp_load(request)
    model_state = {k: request["model"][_saved_name(model, k)] for k in model_state}
    for k in optim_state:
        if (name := _parameter_of(k)) is not None:
            optim_state[k] = request["optimizer"][f"state.{_saved_name(model, name)}.{k.rsplit('.', 1)[1]}"]
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optim_state, options=_flat())


def load_full_stage(model: Transformer, optimizer: torch.optim.Optimizer, full_model: dict[str, torch.Tensor],
                    full_optimizer: dict[str, Any]) -> None:
    """Load this stage's part of one process's (unsharded) model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    wanted_model = {k: full_model[_saved_name(model, k)] for k in model_state}
    # This stage's parameter groups (the recipe's settings) with its parameters' saved state.
    wanted_optim = {"state": {name: full_optimizer["state"][_saved_name(model, name)] for name in optim_state["state"]},
                    "param_groups": optim_state["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=wanted_model, optim_state_dict=wanted_optim,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
