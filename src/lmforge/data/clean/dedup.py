"""Global deduplication: exact (normalized-content hash) then near-duplicate MinHash-LSH.

Runs once over the signatures that the workers wrote, with memory proportional to the
number of documents (a 64-bit key per band per document), not to the corpus size:
signatures are read from a memory-mapped file only for the candidate pairs.

Near duplicates: documents sharing any band key are candidates; a candidate pair is kept
when its estimated Jaccard similarity (the fraction of equal signature values) reaches
`threshold`; the verified pairs are joined into clusters, and the document that came
first in input order represents its cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import hashlib

import numpy as np

from lmforge.data.clean.minhash import EMPTY, band_keys, estimated_jaccard

KEEP, EXACT, NEAR = 0, 1, 2
_VERIFY_CHUNK = 65536


def exact_key(text: str) -> int:
    """Hash of the text with case and whitespace differences removed."""
    digest = hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class DedupResult:
    verdict: np.ndarray  # (N,) uint8: KEEP, EXACT or NEAR
    cluster_size: np.ndarray  # (N,) int32: size of the near-duplicate cluster each document is in
    candidate_pairs: int
    verified_pairs: np.ndarray  # (P, 2) int64 verified near-duplicate pairs (i < j)


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """Mask of documents whose hash appeared earlier."""
    _, first = np.unique(hashes, return_index=True)
    repeated = np.ones(len(hashes), dtype=bool)
    repeated[first] = False
    return repeated


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(P, 2) pairs i < j that share a bucket in some band (neighbours in each bucket)."""
    pairs = []
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        ordered = keys[order, band]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(same):
            pairs.append(np.stack([order[same], order[same + 1]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(pairs).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label of each node = the smallest index in its component (min-label propagation)."""
    labels = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    left, right = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(labels[left], labels[right])
        before = labels.copy()
        np.minimum.at(labels, left, low)
        np.minimum.at(labels, right, low)
        labels = labels[labels]  # pointer jumping: follow labels to their own labels
        if np.array_equal(labels, before):
            return labels


def deduplicate(signatures: np.ndarray, hashes: np.ndarray, *, exact: bool, near: bool, bands: int, rows: int,
                threshold: float) -> DedupResult:
    n = len(hashes)
    verdict = np.zeros(n, dtype=np.uint8)
    if exact and n:
        verdict[exact_duplicates(hashes)] = EXACT
    cluster_size = np.ones(n, dtype=np.int32)
    verified = np.zeros((0, 2), dtype=np.int64)
    n_candidates = 0
    if near and n:
        alive = np.flatnonzero((verdict == KEEP) & (np.asarray(signatures[:, 0]) != EMPTY))
        keys = np.concatenate([band_keys(np.asarray(signatures[alive[i : i + _VERIFY_CHUNK]]), bands, rows)
                               for i in range(0, len(alive), _VERIFY_CHUNK)]) if len(alive) else np.zeros((0, bands), np.uint64)
        local = candidate_pairs(keys)
        pairs = alive[local] if len(local) else local
        n_candidates = len(pairs)
        kept = []
        for start in range(0, len(pairs), _VERIFY_CHUNK):
            chunk = pairs[start : start + _VERIFY_CHUNK]
            similarity = estimated_jaccard(np.asarray(signatures[chunk[:, 0]]), np.asarray(signatures[chunk[:, 1]]))
            kept.append(chunk[similarity >= threshold])
        if kept:
            verified = np.concatenate(kept)
        labels = connected_components(n, verified)
        sizes = np.bincount(labels, minlength=n)
        cluster_size = sizes[labels].astype(np.int32)
        verdict[(labels != np.arange(n)) & (verdict == KEEP)] = NEAR
    return DedupResult(verdict, cluster_size, n_candidates, verified)
