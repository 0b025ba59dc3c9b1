"""Automatic prefix caching: the keys and values of prompt prefixes that earlier requests
computed (a shared system prompt, few-shot examples, a conversation's history), kept so a
new prompt that starts the same way computes only the rest.

The engine's KV cache gives each sequence one contiguous slot (the native decoder reads
it in place), so cached keys and values cannot be shared by pointing at them: a hit copies
them into the slot, which costs a memory copy where a prefill costs a forward pass. That
decides the shape of the cache: fixed-size blocks of `BLOCK` tokens, each keyed by (its
parent block, its tokens), as vLLM does. A prompt's blocks are found by walking that chain
from the start; equal-size blocks make the memory budget a count of blocks and eviction a
plain least-recently-used list. A radix tree would share prefixes at any token, not only
at block ends, but its nodes have every size, and a hit copies just as much.

Exactness: the keys are the blocks' tokens themselves (a dict compares them in full), not a
digest, so no collision can hand one prompt another's keys. The engine computes a prompt
one of two ways, as rows of a native decoding step or as a PyTorch prefill, which round
differently, so each way has its own chain root (a `lane`) and a hit reuses only numbers
computed the way the request itself is computed. The native step computes every row
alone, so a hit there gives bitwise the logits of the cache-off engine. A PyTorch prefill
of a prompt's rest after a hit runs matmuls of another shape than the whole prompt's,
which BLAS may round differently in the last bits: the same tokens, logits equal to
float32 rounding (tests/infer/test_prefix_cache.py checks both).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per block: short enough to share most of a prompt, long enough to be cheap to keep


@dataclass
class _Block:
    id: int
    key: tuple
    kv: torch.Tensor  # (n_layer, 2, n_kv_head, BLOCK, head_dim): keys then values of each layer


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    prompt_tokens: int = 0  # their tokens
    hit_tokens: int = 0  # of those, the tokens whose keys and values came from the cache
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixCache:
    """Blocks of cached keys and values within `budget_bytes`, least recently used evicted first.
    Used by one thread (the engine's); `stats` may be read from any."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("the prefix cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # (parent id or lane, tokens) -> block
        self._next_id = 0
        self.block_bytes = 0  # known once the first block is stored
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def used_bytes(self) -> int:
        return len(self._blocks) * self.block_bytes


    def lookup(self, lane: str, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
               slot: int) -> int:
        """Copy the longest cached prefix of `tokens` into `slot` of the per-layer (slots, h, capacity, d)
        tensors; returns its length in tokens (a multiple of BLOCK). At least the last token is
        left to compute: its logits are what the prompt is for."""
        hits: list[_Block] = []
        parent: object = lane
        for b in range((len(tokens) - 1) // BLOCK):
            block = self._blocks.get((parent, tuple(tokens[b * BLOCK:(b + 1) * BLOCK])))
            if block is None:
                break
            hits.append(block)
            parent = block.id
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(tokens)
        if not hits:
            return 0
        self.stats.hit_tokens += len(hits) * BLOCK
        n = len(hits) * BLOCK
        kv = torch.cat([b.kv for b in hits], dim=3)  # (n_layer, 2, h, n, d)
        for layer, (k, v) in enumerate(zip(keys, values)):
            k[slot, :, :n] = kv[layer, 0]
            v[slot, :, :n] = kv[layer, 1]
        self._touch(hits)
        return n

    def store(self, lane: str, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
              slot: int) -> None:
        """Keep the whole blocks of `tokens`, whose keys and values are in `slot`, that are not cached yet."""
        if self.budget_bytes == 0:
            return
        parent: object = lane
        chain = []
        for b in range(len(tokens) // BLOCK):
            key = (parent, tuple(tokens[b * BLOCK:(b + 1) * BLOCK]))
            block = self._blocks.get(key)
            if block is None:
                cols = slice(b * BLOCK, (b + 1) * BLOCK)
                kv = torch.stack([torch.stack([k[slot, :, cols], v[slot, :, cols]]) for k, v in zip(keys, values)])
                self.block_bytes = kv.numel() * kv.element_size()
                if self.block_bytes > self.budget_bytes:
                    return
                block = self._blocks[key] = _Block(self._next_id, key, kv)
                self._next_id += 1
            chain.append(block)
            parent = block.id
        self._touch(chain)
        self._evict()

    def _touch(self, chain: list[_Block]) -> None:
        """Mark a chain used, its first block most recently: eviction then takes the ends of
        chains before their beginnings, which other prompts may still share."""
        for b in reversed(chain):
            self._blocks.move_to_end(b.key)

    def _evict(self) -> None:
        while self.used_bytes > self.budget_bytes and len(self._blocks) > 0:
            self._blocks.popitem(last=False)
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        self._blocks.clear()
