"""Batches of token windows from prepared shards, deterministic and resumable.

Batch number i is drawn from a generator seeded by (seed, i) alone, so a run resumed at
cursor i sees exactly the batches an uninterrupted run would have seen: the cursor is
the whole loader state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.prepare import read_index
from lmforge.errors import LmforgeError


class TokenSplit:
    """One split (train or val) of a prepared directory, memory-mapped."""

    def __init__(self, folder: str | Path, split: str):
        index = read_index(folder)
        info = index["splits"][split]
        dtype = np.dtype(index["dtype"])
        self.shards = []
        for name in info["files"]:
            path = Path(folder) / name
            if not path.is_file():
                raise LmforgeError(f"{path} is missing; run `lmforge data prepare` again")
            size = path.stat().st_size
            if size == 0 or size % dtype.itemsize:  # numpy cannot map these at all
                raise LmforgeError(f"{path} is truncated ({size} bytes); run `lmforge data prepare` again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.tokens = sum(len(s) for s in self.shards)
        if self.tokens != info["tokens"]:
            raise LmforgeError(f"{folder}: {split} shards hold {self.tokens} tokens, index says {info['tokens']}; "
                               "the data is truncated: prepare it again")
        self.bytes = info["bytes"]
        self.vocab_size = index["vocab_size"]

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)


class BatchLoader:
    def __init__(self, split: TokenSplit, batch_size: int, seq_len: int, seed: int):
        usable = [len(s) for s in split.shards]
        if max(usable) <= seq_len + 1:
            raise LmforgeError(f"the data split has {max(usable)} tokens per shard, too few for sequences of "
                               f"{seq_len}; use a larger corpus or a shorter --model.context")
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        weights = np.array([max(0, n - seq_len - 1) for n in usable], dtype=np.float64)
        self.weights = weights / weights.sum()

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, for batch number `index`."""
        rng = np.random.default_rng([self.seed, index])
        shard_ids = rng.choice(len(self.split.shards), size=self.batch_size, p=self.weights)
        T = self.seq_len
        rows = []
        for s in shard_ids:
            shard = self.split.shards[s]
            start = int(rng.integers(0, len(shard) - T - 1))
            rows.append(np.asarray(shard[start:start + T + 1], dtype=np.int64))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]


def sequential_windows(split: TokenSplit, seq_len: int, batch_size: int,
                       max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in order (evaluation): every token scored once."""
    xs, ys, n = [], [], 0
    for shard in split.shards:
        for start in range(0, len(shard) - 1, seq_len):
            chunk = np.asarray(shard[start:start + seq_len + 1], dtype=np.int64)
            if len(chunk) < seq_len + 1:
                break  # a ragged tail would need padding; skipping it biases nothing measurable
            xs.append(chunk[:-1])
            ys.append(chunk[1:])
            if len(xs) == batch_size:
                yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
                xs, ys, n = [], [], n + 1
                if max_batches is not None and n >= max_batches:
                    return
    if xs:
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
