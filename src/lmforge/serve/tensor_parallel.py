"""One model split over N processes for generation (`lmforge generate --tp N`).

Every process (a torchrun rank) loads the model and keeps its tensor-parallel part
(`train.tensor_parallel`: its attention heads, its slice of the MLP and of the vocabulary), and
its own KV cache holds only its key/value heads. Rank 0 runs the ordinary decoding loop
(`infer.generate`, the PyTorch path) against `SplitModel`, which sends each call (a new cache,
a forward pass over some tokens) to the other ranks before taking part in it itself; they
`follow` until rank 0 says stop. Sampling, stop strings and streaming happen on rank 0 only, so
the ranks never need to agree on anything but the tokens they are sent. The logits come back
whole (gathered over the vocabulary) on rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.infer.generate import Completion, TextCallback, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model.kv_cache import KVCache
from lmforge.train import tensor_parallel


def split(model: Transformer) -> Transformer:
    """`model` (the same whole model on every rank) cut into this rank's tensor-parallel part."""
    world = dist.get_world_size()
    tensor_parallel.check_model(model.config, world)
    tensor_parallel.parallelize(model, tensor_parallel.mesh_of(world, world, torch.device("cpu")))
    return model.eval()


class SplitModel:
    """Rank 0's handle on the split model: what `infer.generate.generate_ids` calls."""

    def __init__(self, model: Transformer):
        self.model, self.config, self.tok_emb = model, model.config, model.tok_emb

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        _send(("cache", batch, capacity))
        return _local_cache(self.model, batch, capacity)

    def __call__(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, pad_mask: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor:
        _send(("forward", input_ids, pad_mask, last_only))
        return _forward(self.model, input_ids, kv_cache, pad_mask, last_only)

    def close(self) -> None:
        _send(("stop",))


def follow(model: Transformer) -> None:
    """Ranks other than 0: run what rank 0's `SplitModel` is asked, until it closes."""
    cache = None
    while True:
        command = _receive()
        if command[0] == "stop":
            return
        if command[0] == "cache":
            cache = _local_cache(model, command[1], command[2])
        else:
            _, input_ids, pad_mask, last_only = command
            _forward(model, input_ids, cache, pad_mask, last_only)


def _local_cache(model: Transformer, batch: int, capacity: int | None) -> KVCache:
    """A cache of this rank's key/value heads only."""
    cfg, tp = model.config, dist.get_world_size()
    p = model.tok_emb.weight
    return KVCache(cfg.n_layer, batch, cfg.kv_heads // tp, cfg.dim_head, capacity or cfg.context, p.dtype,
                   p.to_local().device)


@torch.inference_mode()
def _forward(model, input_ids, cache, pad_mask, last_only) -> torch.Tensor:
    return model(input_ids, cache, pad_mask=pad_mask, last_only=last_only).full_tensor()


def _send(command: tuple) -> None:
    dist.broadcast_object_list([command], src=0)


def _receive() -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def join(tp: int) -> None:
    """Join torchrun's process group of `tp` processes (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise LmforgeError(f"--tp {tp} needs {tp} processes, but torchrun started {world}; "
                           f"run it without torchrun, or with --nproc_per_node {tp}")
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def generate_split(model_dir, tp: int, prompts: list[str], params: SamplingParams,
                   on_text: TextCallback | None = None) -> list[Completion] | None:
    """Under torchrun with `tp` processes: the model of `model_dir` split over them, and the
    prompts' completions on rank 0 (None on the others, which only follow)."""
    import lmforge

    join(tp)
    loaded = lmforge.load(model_dir)
    loaded.check_generates()
    model = split(loaded.model)
    if dist.get_rank() != 0:
        follow(model)
        return None
    driver = SplitModel(model)
    try:
        return generate(driver, loaded.tokenizer, prompts, params, on_text, native=False)
    finally:
        driver.close()
