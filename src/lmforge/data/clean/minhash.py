"""MinHash signatures over token n-gram shingles, vectorized with numpy.

Shingles are n-grams of `text.words` tokens of the lower-cased text: word n-grams for
space-delimited scripts, character n-grams for Chinese and Japanese (one token per
character), both in one pass for mixed text. Tokens are found and hashed with numpy over
the code points (no Python call per token), an n-gram hash is a polynomial of its token
hashes, and the `num_perm` hash functions are
multiply-add over 64 bits keeping the high 32 bits (min of the high bits equals the high
bits of the min, so the shift happens after the reduction).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from lmforge.data.clean.text import CJK_RE, JOINERS

_POLY = np.uint64(0x100000001B3)  # FNV prime: odd, so invertible modulo 2**64
_POLY_INVERSE = np.uint64(pow(0x100000001B3, -1, 2**64))
_BLOCK = 4096  # shingles per block: bounds the (block, num_perm) work array to a few MB
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document without shingles


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Class of every code point: 0 separator, 1 word character (as regex \\w), 2 CJK, 3 joiner."""
    every = "".join(map(chr, range(0x110000)))
    classes = np.zeros(0x110000, dtype=np.uint8)
    classes[[m.start() for m in re.finditer(r"\w", every)]] = 1
    classes[[m.start() for m in CJK_RE.finditer(every)]] = 2
    classes[[ord(c) for c in JOINERS]] = 3
    return classes


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the whole 64-bit word."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**k and P**-k modulo 2**64 for k < n, grown by doubling and kept for the next document."""
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers), 4096)
        _powers = np.cumprod(np.concatenate(([np.uint64(1)], np.full(size - 1, _POLY, dtype=np.uint64))))
        _inverse_powers = np.cumprod(np.concatenate(([np.uint64(1)], np.full(size - 1, _POLY_INVERSE, dtype=np.uint64))))
    return _powers, _inverse_powers


def token_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of each `text.words` token of the lower-cased text, vectorized.

    The same tokens as the regex in `text.words` (runs of word characters, joined by an
    apostrophe or hyphen between two of them; one token per CJK character), found and
    hashed over the UTF-32 code points with numpy instead of one Python call per token.
    """
    codes = np.frombuffer(text.lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    kind = _char_classes()[codes]
    word = kind == 1
    joiners = np.flatnonzero(kind[1:-1] == 3) + 1
    if len(joiners):  # a joiner is a word character between two word characters
        word[joiners[word[joiners - 1] & word[joiners + 1]]] = True
    edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    cjk = np.flatnonzero(kind == 2)
    if len(cjk):  # each CJK character is a token of its own
        order = np.argsort(np.concatenate((starts, cjk)), kind="stable")
        starts = np.concatenate((starts, cjk))[order]
        ends = np.concatenate((ends, cjk + 1))[order]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    # polynomial hash of each token's code points: prefix sums of c_k * P^k, then times P^-start
    powers, inverse = _power_tables(n)
    prefix = np.empty(n + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(codes * powers[:n], out=prefix[1:])
    return _mix((prefix[ends] - prefix[starts]) * inverse[starts] + (ends - starts).astype(np.uint64))


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
