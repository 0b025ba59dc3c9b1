"""Calibration sequences for GPTQ and Wanda, and the per-block activation replay both use.

Both methods look at the inputs each linear layer actually sees. `block_inputs` computes
the first block's inputs for every calibration sequence; `replay` then runs one block at
a time, so a method can change block i and feed block i+1 the changed outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

MIN_SEQUENCES = 16


def calibration_tokens(data: str | Path | None, tokenizer: TextTokenizer, vocab: int, samples: int,
                       seq_len: int, seed: int = 0) -> torch.Tensor:
    """(samples, seq_len) int64 windows drawn at random from a prepared data directory
    (its train split) or a UTF-8 text file."""
    if data is None:
        raise LmforgeError("this method needs calibration data: --data DIR (from `lmforge data prepare`) or a text file")
    path = Path(data)
    if path.is_dir():
        from lmforge.data.loader import TokenSplit

        split = TokenSplit(path, "train")
        if split.vocab_size > vocab:
            raise LmforgeError(f"{path} was tokenized with a larger vocabulary than the model has; "
                               "prepare it with the model's tokenizer")
        stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in split.shards])
    elif path.is_file():
        try:
            stream = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8")), dtype=np.int64)
        except UnicodeDecodeError:
            raise LmforgeError(f"{path} is not UTF-8 text") from None
    else:
        raise LmforgeError(f"calibration data {path} not found")
    windows = len(stream) // seq_len
    if windows < MIN_SEQUENCES:
        raise LmforgeError(f"{path} holds {len(stream):,} tokens: {windows} sequences of {seq_len}, fewer than the "
                           f"{MIN_SEQUENCES} calibration needs at least (a few hundred is better); give more text")
    rng = np.random.default_rng(seed)
    starts = rng.choice(windows, size=min(samples, windows), replace=False) * seq_len
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]))


@torch.no_grad()
def block_inputs(model: Transformer, tokens: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    """Hidden states entering block 0, in batches."""
    out = []
    for i in range(0, len(tokens), batch):
        out.append(model.embed(tokens[i:i + batch]))
    return out


@torch.no_grad()
def replay(model: Transformer, layer: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run block `layer` on every batch of inputs; returns its outputs."""
    block = model.blocks[layer]
    rope, mask, is_causal = model.layer_inputs(layer, inputs[0].shape[1], inputs[0].dtype, inputs[0].device)
    return [block(x, rope, None, layer, mask, is_causal) for x in inputs]


class InputStats:
    """Forward hooks collecting what each named linear layer sees: the Gram matrix X^T X
    (GPTQ's Hessian) and the squared norm of each input feature (Wanda)."""

    def __init__(self, model: nn.Module, names: list[str], gram: bool):
        self.gram, self.sq, self.count = {}, {}, {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name, gram)))

    def _hook(self, name: str, gram: bool):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if gram:
                self.gram[name] = self.gram.get(name, 0) + x.T @ x
            self.sq[name] = self.sq.get(name, 0) + (x * x).sum(0)
            self.count[name] = self.count.get(name, 0) + x.shape[0]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def blocks_with_inputs(model: Transformer, tokens: torch.Tensor) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(layer, inputs to it) for each block in order; the caller may modify block `layer`
    before the next iteration, whose inputs are then computed through the modified block."""
    inputs = block_inputs(model, tokens)
    for layer in range(len(model.blocks)):
        yield layer, inputs
        inputs = replay(model, layer, inputs)
    yield len(model.blocks), [model.norm_f(x) for x in inputs]  # what lm_head sees
