"""Near-duplicate detection: lmforge's MinHash-LSH against datasketch on one planted corpus.

    .venv/bin/python benchmarks/dedup.py [--docs 3000] [--threshold 0.8]

The corpus (lmforge.data.clean.synthetic) mixes English-like and Chinese documents with
planted variants: word/character substitutions, shuffled paragraphs, both, and hard
negatives (60% rewritten). Both sides get the same shingles (`text.words` tokens of the
lower-cased text, 5-grams: words for English, characters for Chinese), 112 hash
functions in 14 bands × 8 rows, and the same verification (estimated Jaccard ≥ threshold).

Truth: a pair is a duplicate when the exact Jaccard similarity of its shingle sets is ≥
the threshold; it is computed for every planted pair and every pair either side reports.
Precision and recall are over pairs; throughput is the UTF-8 size of the corpus divided by
the wall time from raw text to duplicate pairs, one process each, measured back to back.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np

from lmforge.data.clean.dedup import connected_components, deduplicate
from lmforge.data.clean.minhash import MinHasher
from lmforge.data.clean.synthetic import generate
from lmforge.data.clean.text import words


def shingle_strings(text: str, n: int = 5) -> list[str]:
    tokens = words(text.lower())
    if len(tokens) < n:
        return [" ".join(tokens)] if tokens else []
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def run_lmforge(texts: list[str], bands: int, rows: int, threshold: float) -> tuple[set, float]:
    start = time.perf_counter()
    hasher = MinHasher(bands * rows, ngram=5, seed=1)
    signatures = np.stack([hasher.signature(t) for t in texts])
    hashes = np.arange(len(texts), dtype=np.uint64)  # exact dedup off: every pair goes through LSH
    result = deduplicate(signatures, hashes, exact=False, near=True, bands=bands, rows=rows, threshold=threshold)
    labels = connected_components(len(texts), result.verified_pairs)
    elapsed = time.perf_counter() - start
    return cluster_pairs(labels), elapsed


def run_datasketch(texts: list[str], bands: int, rows: int, threshold: float) -> tuple[set, set, float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    sketches = []
    raw_pairs, verified = set(), []
    for i, text in enumerate(texts):
        sketch = MinHash(num_perm=bands * rows, seed=1)
        sketch.update_batch([s.encode() for s in shingle_strings(text)])
        for j in lsh.query(sketch):
            raw_pairs.add((j, i))
            if sketch.jaccard(sketches[j]) >= threshold:
                verified.append((j, i))
        lsh.insert(i, sketch)
        sketches.append(sketch)
    labels = connected_components(len(texts), np.array(verified, dtype=np.int64).reshape(-1, 2))
    elapsed = time.perf_counter() - start
    return cluster_pairs(labels), raw_pairs, elapsed


def cluster_pairs(labels: np.ndarray) -> set:
    """Every pair (i < j) that ended in the same cluster."""
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        clusters.setdefault(label, []).append(index)
    return {(a, b) for members in clusters.values() if len(members) > 1
            for k, a in enumerate(members) for b in members[k + 1 :]}


def score(found: set, truth: set) -> dict:
    hits = len(found & truth)
    return {"pairs_reported": len(found), "precision": hits / len(found) if found else 1.0,
            "recall": hits / len(truth) if truth else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="original documents (variants are added on top)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--bands", type=int, default=14)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = generate(args.docs, duplicate_share=0.3, chinese_share=0.3, seed=args.seed)
    texts = corpus.texts
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB, {len(corpus.planted)} planted variants")

    ours, ours_s = run_lmforge(texts, args.bands, args.rows, args.threshold)
    theirs, theirs_raw, theirs_s = run_datasketch(texts, args.bands, args.rows, args.threshold)

    shingles: dict[int, set] = {}

    def similarity(a: int, b: int) -> float:
        for i in (a, b):
            if i not in shingles:
                shingles[i] = set(shingle_strings(texts[i]))
        return jaccard(shingles[a], shingles[b])

    candidates = {(min(a, b), max(a, b)) for a, b, _ in corpus.planted} | ours | theirs
    similarities = {pair: similarity(*pair) for pair in candidates}
    truth = {pair for pair, value in similarities.items() if value >= args.threshold}

    def recall_by_band(found: set) -> dict:
        bands = {}
        for low, high in ((0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)):
            members = [p for p in truth if low <= similarities[p] < high]
            if members:
                bands[f"{low:.2f}-{min(high, 1.0):.2f}"] = (round(sum(p in found for p in members) / len(members), 3), len(members))
        return bands

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "corpus": {"documents": len(texts), "MB": round(megabytes, 2), "planted": len(corpus.planted),
                   "true_pairs": len(truth), "threshold": args.threshold, "bands": args.bands, "rows": args.rows},
        "lmforge": {**score(ours, truth), "seconds": round(ours_s, 2), "MB_per_s": round(megabytes / ours_s, 2),
                    "recall_by_similarity": recall_by_band(ours)},
        "datasketch": {**score(theirs, truth), "seconds": round(theirs_s, 2), "MB_per_s": round(megabytes / theirs_s, 2),
                       "recall_by_similarity": recall_by_band(theirs),
                       "lsh_candidates_before_verification": len(theirs_raw)},
    }
    report["speedup_vs_datasketch"] = round(theirs_s / ours_s, 2)
    print(json.dumps(report, indent=1))
    print(f"lmforge:    precision {report['lmforge']['precision']:.3f}  recall {report['lmforge']['recall']:.3f}  "
          f"{report['lmforge']['MB_per_s']:.2f} MB/s")
    print(f"datasketch: precision {report['datasketch']['precision']:.3f}  recall {report['datasketch']['recall']:.3f}  "
          f"{report['datasketch']['MB_per_s']:.2f} MB/s")
    print(f"throughput ratio lmforge/datasketch: {report['speedup_vs_datasketch']:.2f}x")


if __name__ == "__main__":
    main()
