"""MinHash signatures over token n-gram shingles, vectorized with numpy.

Shingles are n-grams of `text.words` tokens of the lower-cased text: word n-grams for
space-delimited scripts, character n-grams for Chinese and Japanese (one token per
character), both in one pass for mixed text. Each token is hashed once (xxh64), an
n-gram hash is a polynomial of its token hashes, and the `num_perm` hash functions are
multiply-add over 64 bits keeping the high 32 bits (min of the high bits equals the high
bits of the min, so the shift happens after the reduction).
"""

from __future__ import annotations

import numpy as np
import xxhash

from lmforge.data.clean.text import words

_POLY = np.uint64(0x100000001B3)  # FNV prime: odd, large, spreads carries
_BLOCK = 4096  # shingles per block: bounds the (block, num_perm) work array to a few MB
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document without shingles


def token_hashes(text: str) -> np.ndarray:
    tokens = words(text.lower())
    unique = dict.fromkeys(tokens)  # hash each distinct token once
    for token in unique:
        unique[token] = xxhash.xxh64_intdigest(token.encode())
    return np.fromiter(map(unique.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of token hashes; a text shorter than n is one shingle."""
    m = len(hashes)
    if m == 0:
        return hashes
    if m < n:
        n = m
    grams = hashes[: m - n + 1].copy()
    for k in range(1, n):
        grams *= _POLY
        grams += hashes[k : m - n + 1 + k]
    return grams


class MinHasher:
    def __init__(self, num_perm: int, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.ngram = ngram
        self.num_perm = num_perm
        self.mul = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.add = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        shingles = ngram_hashes(token_hashes(text), self.ngram)
        if len(shingles) == 0:
            return np.full(self.num_perm, EMPTY, dtype=np.uint32)
        low = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _BLOCK):
            block = shingles[start : start + _BLOCK, None] * self.mul
            block += self.add
            np.minimum(low, block.min(axis=0), out=low)
        return (low >> np.uint64(32)).astype(np.uint32)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, num_perm) uint32 signatures -> (N, bands) uint64 bucket keys, one per band."""
    n = len(signatures)
    grouped = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    for r in range(rows):
        keys *= _POLY
        keys += grouped[:, :, r] + np.uint64(1)
    return keys


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal signature values: the MinHash estimate of Jaccard similarity."""
    return (a == b).mean(axis=-1)
