"""This rank's tensor-parallel part of a model directory, read alone (`generate/serve --tp N`).

The model is built on the meta device and split there (`train.tensor_parallel.parallelize`), so
every parameter is a DTensor that knows which rows or columns of the whole tensor this rank
holds; only those are then read from the safetensors files (`safe_open(...).get_slice`, which
reads the bytes of the slice and no more), through the same family rules as a whole load
(`interop.weights`). A rank's memory is thus its share of the split matrices plus the
replicated norms, never the whole model. The fused q/k/v and gate/up rows a rank holds are
its part of each segment (`shard_order`), read from the separate Hugging Face tensors.

Directories stored otherwise (quantized, sparse, encrypted, pickled) are loaded whole on each
rank and then cut.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lmforge.interop.families import Rule
from lmforge.interop.weights import SafetensorsFiles, checked_skeleton, default_dtype
from lmforge.loaded import LoadedModel
from lmforge.model import Transformer
from lmforge.model_dir import weight_source
from lmforge.interop.crypto import ENCRYPTION_FILE
from lmforge.model_files import check_tokenizer_fits, load_tokenizer, read_json, refuse_links_out
from lmforge.train import tensor_parallel


def split(model: Transformer, device: torch.device) -> Transformer:
    """`model` (the same whole model on every rank) cut into this rank's tensor-parallel part."""
    import torch.distributed as dist

    world = dist.get_world_size()
    tensor_parallel.parallelize(model, tensor_parallel.mesh_of(world, world, device))
    return model.eval()


def load_shard(model_dir: str | Path, device: torch.device) -> LoadedModel:
    """This rank's part of the model in `model_dir` (under an initialised process group)."""
    import torch.distributed as dist

    import lmforge
    from lmforge.interop.hf import from_hf_config
    from lmforge.errors import LmforgeError

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise LmforgeError(f"model directory {model_dir} not found")
    hf_config = read_json(folder / "config.json")
    source = None
    if not ({"quantization_config", "sparsity_config"} & set(hf_config) or (folder / ENCRYPTION_FILE).is_file()):
        refuse_links_out(folder)
        source = weight_source(folder)
    if not isinstance(source, SafetensorsFiles):
        whole = lmforge.load(folder, device=str(device))
        tensor_parallel.check_model(whole.config, dist.get_world_size())
        return LoadedModel(split(whole.model, device), whole.tokenizer, whole.path, whole.meta)
    cfg = from_hf_config(hf_config)
    tensor_parallel.check_model(cfg, dist.get_world_size())
    tokenizer = load_tokenizer(folder)
    check_tokenizer_fits(tokenizer, cfg.vocab, folder)
    model, names, rules = checked_skeleton(source, cfg)
    dtype = default_dtype(source)
    for module in model.modules():  # the skeleton's meta tensors in the dtype the rank will hold
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, dtype=dtype), p.requires_grad)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    split(model, device)
    _fill(model, rules, _SliceReader(source, names), dtype, device)
    with torch.device(device):
        model.init_rope()
    meta = read_json(folder / "lmforge.json") if (folder / "lmforge.json").is_file() else {}
    return LoadedModel(model.eval(), tokenizer, folder, meta)


class _SliceReader:
    """Parts of the source's tensors, by their Hugging Face names."""

    def __init__(self, source: SafetensorsFiles, names: dict[str, str]):
        self.source, self.names, self.files = source, names, {}

    def read(self, theirs: str, index: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        name = self.names[theirs]
        path = self.source.entries[name][0]
        if path not in self.files:
            self.files[path] = safe_open(str(path), framework="pt")
        return self.files[path].get_slice(name)[index]

    def release(self) -> None:
        """Unmap the files: the pages a column slice touched (all of its tensor's) leave the resident set."""
        self.files.clear()


def _runs(rows: list[int]) -> list[slice]:
    """Consecutive runs of `rows`, as slices."""
    out, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            out.append(slice(rows[start], rows[i - 1] + 1))
            start = i
    return out


def _block(rule: Rule, reader: _SliceReader, rows: slice, cols: slice | None) -> torch.Tensor:
    """Rows `rows` (and columns `cols`) of our tensor `rule.ours`, read from theirs."""
    rest = () if cols is None else (cols,)
    if rule.kind == "transpose":
        return reader.read(rule.theirs[0], (*rest, rows)).t()
    if rule.kind == "concat":
        start = 0
        for theirs, size in zip(rule.theirs, rule.sizes):
            if start <= rows.start < start + size:
                return reader.read(theirs, (slice(rows.start - start, rows.stop - start), *rest))
            start += size
        raise ValueError(f"rows {rows} are outside {rule.ours}")
    block = reader.read(rule.theirs[0], (rows, *rest))
    return block.float() + 1 if rule.kind == "plus_one" else block


def _fill(model: Transformer, rules: list[Rule], reader: _SliceReader, dtype: torch.dtype,
          device: torch.device) -> None:
    """Give each of the split model's DTensor parameters its local rows, read from the files."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    fused = tensor_parallel.fused_segments(model.config)
    tp = model.tok_emb.weight.device_mesh.size()
    for rule in rules:
        owner_name, _, pname = rule.ours.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = getattr(owner, pname)
        sizes, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        rows = list(range(offsets[0], offsets[0] + sizes[0]))
        if rule.ours in fused:  # the permuted layout's rows, in the model's own order
            rows = tensor_parallel.shard_order(fused[rule.ours], tp)[rows[0]:rows[-1] + 1].tolist() if rows else []
        cols = slice(offsets[1], offsets[1] + sizes[1]) if p.dim() > 1 else None
        parts = [_block(rule, reader, run, cols) for run in _runs(rows)]
        reader.release()
        local = (torch.cat(parts) if parts else torch.empty(sizes)).to(dtype=dtype, device=device).contiguous()
        whole = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride())
        setattr(owner, pname, nn.Parameter(whole, requires_grad=p.requires_grad))
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
