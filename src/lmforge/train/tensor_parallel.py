"""Tensor parallelism applied *to* the model (`train.parallel: tp` and `fsdp+tp`), on
`torch.distributed.tensor.parallel`; the model file never knows about it.

Each Transformer block's matmuls are split over the `tp` processes of a DeviceMesh as in
Megatron-LM: the fused query/key/value and gate/up projections column-wise (each rank computes
its heads, and its slice of the MLP's hidden units, with no communication), the attention's
output and the MLP's down projection row-wise (one all-reduce each). The embedding is split
over the vocabulary and the output layer over its columns, and the loss is computed on the
vocabulary-sharded logits (`loss_parallel`), so no rank ever holds a (tokens x vocabulary)
matrix. Norms and the learned positions are replicated DTensors. Every parameter is then a
DTensor on the mesh, which is what gradient clipping, the optimizer and DCP expect.

A fused projection holds segments (q, k, v; gate, up) that must each be split across ranks,
but DTensor's `Shard(0)` splits a tensor into contiguous runs of rows. So before sharding the
rows are reordered (`shard_order`) so that rank r's run is [q_r; k_r; v_r]; the sharded
tensor's global view is that permuted matrix. Everything that leaves the process in the
model's own layout is put back: the DCP checkpoint writes each rank's rows at their true
offsets (`checkpoint_view`), and whole state dicts are un-permuted (`true_layout`) or
permuted on the way in (`tp_layout`). A checkpoint written under any layout therefore loads
under any other.

`fsdp+tp` is a 2-D mesh (dp x tp): FSDP2 shards each block over the `dp` dimension of the
tensor-parallel DTensors, and each dp rank trains on its rows of the global batch.

Sequence parallelism (norms on sequence-sharded activations) is not applied: at the model
sizes a CPU trains, the activations it would split are small next to the weights, and it
adds a collective per norm.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.train.distributed import DistContext


def check_model(cfg: ModelConfig, tp: int) -> None:
    """Refuse, in one line, a model whose heads or widths do not split over `tp` ranks."""
    if cfg.n_experts:
        raise LmforgeError("train.parallel tp does not split mixture-of-experts layers; "
                           "use --train.parallel fsdp or ddp for this model")
    if cfg.kv_heads % tp:
        raise LmforgeError(f"model has {cfg.kv_heads} key/value heads, not divisible by tp_size {tp}: "
                           f"use a tp_size that divides {cfg.kv_heads}")
    if cfg.n_head % tp:
        raise LmforgeError(f"model has {cfg.n_head} attention heads, not divisible by tp_size {tp}")
    if cfg.ffn_dim % tp:
        raise LmforgeError(f"the MLP width {cfg.ffn_dim} is not divisible by tp_size {tp}")


def mesh_of(world: int, tp: int, device: torch.device):
    """The (dp, tp) DeviceMesh of `world` processes: rank = dp_rank * tp + tp_rank."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


# ----------------------------------------------------------------------------- fused layouts

def fused_segments(cfg: ModelConfig) -> dict[str, list[int]]:
    """The state-dict names of the fused projections, with the sizes of the row segments each
    stacks (q, k, v; gate, up) that are split across ranks separately."""
    qkv = [cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head]
    out: dict[str, list[int]] = {}
    for i in range(cfg.n_layer):
        for kind in ("weight", "bias") if cfg.has_qkv_bias else ("weight",):
            out[f"blocks.{i}.attn.qkv.{kind}"] = qkv
        if cfg.family != "gpt2":  # gated MLP: gate and up in one matrix
            for kind in ("weight", "bias") if cfg.uses_bias else ("weight",):
                out[f"blocks.{i}.mlp.up.{kind}"] = [cfg.ffn_dim, cfg.ffn_dim]
    return out


def shard_order(segments: list[int], tp: int) -> torch.Tensor:
    """Row order that makes rank r's contiguous `Shard(0)` run hold its part of every segment:
    permuted = true[order]."""
    starts = [sum(segments[:j]) for j in range(len(segments))]
    return torch.cat([torch.arange(start + r * size // tp, start + (r + 1) * size // tp)
                      for r in range(tp) for start, size in zip(starts, segments)])


def _fused_name(key: str, fused: dict[str, list[int]]) -> str | None:
    """The fused parameter a state-dict `key` is (or is optimizer state of), if any."""
    for name in fused:
        if key == name or key.endswith("." + name) or f".{name}." in f".{key}.":
            return name
    return None


def _map_tensors(state: Any, cfg: ModelConfig, tp: int, fn) -> Any:
    """`state` (a model or optimizer state dict, nested) with fn(order, tensor) applied to the
    tensors of fused parameters (those with as many rows as the parameter)."""
    if tp == 1:
        return state
    fused = fused_segments(cfg)
    orders = {name: shard_order(seg, tp) for name, seg in fused.items()}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        name = _fused_name(key, fused)
        if name is not None and isinstance(value, torch.Tensor) and value.dim() >= 1 \
                and value.shape[0] == len(orders[name]):
            return fn(orders[name], value)
        return value

    return walk(state, "")


def true_layout(state: Any, cfg: ModelConfig, tp: int) -> Any:
    """Whole (gathered) tensors of a tensor-parallel model, put back in the model's own row order."""
    def unpermute(order: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)
        out[order.to(t.device)] = t
        return out

    return _map_tensors(state, cfg, tp, unpermute)


def tp_layout(state: Any, cfg: ModelConfig, tp: int) -> Any:
    """Whole tensors in the model's own row order, permuted as a tensor-parallel model holds them."""
    return _map_tensors(state, cfg, tp, lambda order, t: t[order.to(t.device)])


# ----------------------------------------------------------------------------- applying it

def parallelize(model: nn.Module, mesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Split `model` over mesh["tp"] (and shard it with FSDP2 over mesh["dp"] when that has
    more than one rank); returns the model itself, changed in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg, tp_mesh = model.config, mesh["tp"]
    tp = tp_mesh.size()
    check_model(cfg, tp)
    with torch.no_grad():  # every rank holds the same initial weights: reorder them before sharding
        params = dict(model.named_parameters())
        for name, segments in fused_segments(cfg).items():
            params[name].copy_(params[name][shard_order(segments, tp)])
    plan: dict[str, Any] = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate()),
        # logits stay sharded over the vocabulary: the loss runs under loss_parallel
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.blocks):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.up": ColwiseParallel(), f"blocks.{i}.mlp.down": RowwiseParallel()})
        # The attention views its projection as (heads, dim) and the MLP splits gate from up by
        # these counts: each rank holds 1/tp of them.
        block.attn.n_head, block.attn.n_kv = cfg.n_head // tp, cfg.kv_heads // tp
        block.mlp.hidden = cfg.ffn_dim // tp
    parallelize_module(model, tp_mesh, plan)
    if cfg.tie_embeddings:  # both halves of the tie are sharded over the vocabulary (dim 0) alike
        model.lm_head.weight = model.tok_emb.weight
    _replicate_the_rest(model, tp_mesh)
    model.lm_head.vocab_parallel = True  # evaluation reads this: no chunked loss on sharded logits
    if mesh["dp"].size() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": mesh["dp"]}
        if param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model


def _replicate_the_rest(model: nn.Module, tp_mesh) -> None:
    """Norms, learned positions, q/k norms: replicated DTensors, so that every parameter lives on
    the mesh. They compute on the full (replicated) activations, except the q/k norms, which see
    this rank's heads only: declared sharded over heads, their gradients are summed over ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def partition(name: str, module: nn.Module, mesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, DTensor):
                module.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]),
                                                              requires_grad=p.requires_grad))

    def as_dtensor(placement):
        def to_dtensor(module, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [placement], run_check=False) if isinstance(x, torch.Tensor)
                         else x for x in inputs)
        return to_dtensor

    def to_local(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    heads_of = {id(m) for block in model.blocks for m in (block.attn.q_norm, block.attn.k_norm) if m is not None}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(isinstance(p, DTensor) for p in own):
            layout = Shard(2) if id(module) in heads_of else Replicate()  # (B, T, heads, dim)
            distribute_module(module, tp_mesh, partition, as_dtensor(layout), to_local)


def loss_context(active: bool):
    """Where the loss and its backward run: cross-entropy on vocabulary-sharded logits."""
    if not active:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_view(state: dict[str, Any], cfg: ModelConfig, tp: int) -> dict[str, Any]:
    """`state` (model and optimizer state of this rank, DTensors) for DCP: the fused tensors'
    rows written (and read back) at their offsets in the model's own layout, so the checkpoint
    is the one any other layout writes."""
    from torch.distributed.tensor import DTensor

    def view(order: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _TrueRows(t, order) if isinstance(t, DTensor) else t

    return _map_tensors(state, cfg, tp, view)


class _TrueRows(torch.Tensor):
    """A DTensor's local rows as DCP chunks at their offsets in the un-permuted tensor. The
    chunks are views of the local tensor: DCP writes from them and loads into them in place."""

    @staticmethod
    def __new__(cls, dtensor, order: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, dtensor.shape, dtype=dtensor.dtype,
                                                   device=dtensor.to_local().device)

    def __init__(self, dtensor, order: torch.Tensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        sizes, offsets = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh,
                                                               dtensor.placements)
        local = dtensor.to_local()
        assert list(local.shape) == list(sizes), (local.shape, sizes)
        rows = order[offsets[0]:offsets[0] + sizes[0]].tolist()
        self.pieces: list[tuple[tuple[int, ...], torch.Tensor]] = []
        start = 0
        for i in range(1, len(rows) + 1):  # runs of consecutive true rows
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                self.pieces.append(((rows[start], *offsets[1:]), local[start:i]))
                start = i

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a checkpoint view of a tensor-parallel tensor")

    def __create_write_items__(self, fqn: str, obj: Any):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=piece.shape),
                              properties=TensorProperties.create_from_tensor(piece), size=self.shape))
                for offsets, piece in self.pieces]

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=piece.shape) for offsets, piece in self.pieces]

    def __get_tensor_shard__(self, index):
        for offsets, piece in self.pieces:
            if torch.Size(offsets) == index.offset:
                return piece
        raise ValueError(f"no rows of {index.fqn} at {index.offset} on this rank")


# ----------------------------------------------------------------------------- the process grid

LAYOUTS = ("tp", "fsdp+tp")


@dataclass
class TensorParallelContext(DistContext):
    """A `DistContext` whose processes form a (dp x tp) grid: the `tp_size` ranks of a group hold
    one model between them and draw the same rows of the global batch (all of it under `tp`)."""

    tp_size: int = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_world(self) -> int:
        return self.world // self.tp_size

    def to_model_layout(self, state: Any, config: ModelConfig) -> Any:
        return true_layout(state, config, self.tp_size)

    def from_model_layout(self, state: Any, config: ModelConfig) -> Any:
        return tp_layout(state, config, self.tp_size)

    def split(self, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> nn.Module:
        return parallelize(model, mesh_of(self.world, self.tp_size, device), param_dtype)


def tensor_parallel_context(ctx: DistContext, tc: TrainConfig) -> DistContext:
    """`ctx` as a (dp x tp) grid for train.parallel tp / fsdp+tp, after checking that the
    processes and the batch divide as the layout needs."""
    if not ctx.active:
        return ctx
    tp = tc.tp_size or (ctx.world if tc.parallel == "tp" else 2)
    if tc.parallel == "tp" and tp != ctx.world:
        raise LmforgeError(f"train.parallel tp splits the model over all {ctx.world} processes, but train.tp_size "
                           f"is {tp}; leave tp_size 0, or use --train.parallel fsdp+tp for several groups")
    if tp < 2 or ctx.world % tp:
        raise LmforgeError(f"train.tp_size {tp} does not divide the {ctx.world} processes into groups of 2 or "
                           "more; use a divisor of the process count")
    if tc.batch_size % (ctx.world // tp):
        raise LmforgeError(f"train.batch_size {tc.batch_size} does not split over {ctx.world // tp} data-parallel "
                           f"groups; use a multiple of {ctx.world // tp}")
    if tc.loss_chunk:
        raise LmforgeError("train.loss_chunk is not used with tensor parallelism (each rank already holds only its "
                           "slice of the vocabulary's logits); set it to 0")
    return TensorParallelContext(ctx.rank, ctx.world, ctx.local_rank, ctx.strategy, tp_size=tp)


def tp_size_of(ctx: DistContext) -> int:
    return getattr(ctx, "tp_size", 1) if ctx.active else 1
