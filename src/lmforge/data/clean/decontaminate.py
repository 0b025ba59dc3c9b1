"""Decontamination: drop training documents that share an n-gram with evaluation data.

The evaluation files are read once into a sorted array of n-gram hashes (13 word tokens by
default, as GPT-3 and the Llama papers did); a document is contaminated when any of its
n-grams is in that array.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lmforge.data.clean.minhash import ngram_hashes, token_hashes
from lmforge.data.clean.readers import discover, plan_shards, read_shard
from lmforge.data.clean.recipe import DecontaminateConfig, ReaderConfig


def eval_ngrams(config: DecontaminateConfig) -> np.ndarray:
    files, _ = discover(config.eval_files)
    reader = ReaderConfig(text_field=config.eval_text_field)
    grams = []
    for shard in plan_shards(files, reader.shard_bytes):
        for doc in read_shard(shard, reader, Counter()):
            grams.append(ngram_hashes(token_hashes(doc.text), config.ngram))
    return np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)


def is_contaminated(text: str, grams: np.ndarray, n: int) -> bool:
    if len(grams) == 0:
        return False
    hashes = token_hashes(text)
    if len(hashes) < n:
        return False
    doc = ngram_hashes(hashes, n)
    where = np.minimum(np.searchsorted(grams, doc), len(grams) - 1)
    return bool((grams[where] == doc).any())
