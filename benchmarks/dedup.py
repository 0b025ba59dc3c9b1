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
the time from raw text to duplicate pairs, one process each, `--repeats` runs interleaved
(medians). Both wall and CPU time are given: on a shared machine CPU time is the steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np

from lmforge.data.clean.dedup import connected_components, deduplicate
from lmforge.data.clean.minhash import MinHasher, token_hashes
from lmforge.data.clean.synthetic import generate
from lmforge.data.clean.text import words


def shingle_strings(text: str, n: int = 5) -> list[str]:
    tokens = words(text.lower())
    if len(tokens) < n:
        return [" ".join(tokens)] if tokens else []
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def run_lmforge(texts: list[str], bands: int, rows: int, threshold: float) -> tuple[set, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    hasher = MinHasher(bands * rows, ngram=5, seed=1)
    signatures = np.stack([hasher.signature(t) for t in texts])
    hashes = np.arange(len(texts), dtype=np.uint64)  # exact dedup off: every pair goes through LSH
    result = deduplicate(signatures, hashes, exact=False, near=True, bands=bands, rows=rows, threshold=threshold)
    labels = connected_components(len(texts), result.verified_pairs)
    return cluster_pairs(labels), time.perf_counter() - start, time.process_time() - cpu


def run_datasketch(texts: list[str], bands: int, rows: int, threshold: float) -> tuple[set, set, float, float]:
    from datasketch import MinHash, MinHashLSH

    start, cpu = time.perf_counter(), time.process_time()
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
    return cluster_pairs(labels), raw_pairs, time.perf_counter() - start, time.process_time() - cpu


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, interleaved; medians reported")
    args = parser.parse_args()

    corpus = generate(args.docs, duplicate_share=0.3, chinese_share=0.3, seed=args.seed)
    texts = corpus.texts
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB, {len(corpus.planted)} planted variants")

    token_hashes("warm up")  # builds the per-process code-point table once (~0.4 s), not per corpus
    ours_runs, theirs_runs = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both sides alike
        ours, *ours_time = run_lmforge(texts, args.bands, args.rows, args.threshold)
        theirs, theirs_raw, *theirs_time = run_datasketch(texts, args.bands, args.rows, args.threshold)
        ours_runs.append(ours_time)
        theirs_runs.append(theirs_time)
    ours_s, ours_cpu = (statistics.median(t[i] for t in ours_runs) for i in (0, 1))
    theirs_s, theirs_cpu = (statistics.median(t[i] for t in theirs_runs) for i in (0, 1))

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

    def timing(wall: float, cpu: float, runs: list) -> dict:
        return {"wall_s_median": round(wall, 2), "cpu_s_median": round(cpu, 2), "MB_per_s_wall": round(megabytes / wall, 2),
                "MB_per_s_cpu": round(megabytes / cpu, 2), "wall_s_runs": [round(t[0], 2) for t in runs]}

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "corpus": {"documents": len(texts), "MB": round(megabytes, 2), "planted": len(corpus.planted),
                   "true_pairs": len(truth), "threshold": args.threshold, "bands": args.bands, "rows": args.rows},
        "lmforge": {**score(ours, truth), **timing(ours_s, ours_cpu, ours_runs),
                    "recall_by_similarity": recall_by_band(ours)},
        "datasketch": {**score(theirs, truth), **timing(theirs_s, theirs_cpu, theirs_runs),
                       "recall_by_similarity": recall_by_band(theirs),
                       "lsh_candidates_before_verification": len(theirs_raw)},
        "speedup_wall": round(theirs_s / ours_s, 2),
        "speedup_cpu": round(theirs_cpu / ours_cpu, 2),
    }
    print(json.dumps(report, indent=1))
    for name in ("lmforge", "datasketch"):
        r = report[name]
        print(f"{name:11s} precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
              f"{r['MB_per_s_wall']:.2f} MB/s wall, {r['MB_per_s_cpu']:.2f} MB/s of CPU time")
    print(f"lmforge / datasketch: {report['speedup_wall']:.2f}x wall time, {report['speedup_cpu']:.2f}x CPU time")


if __name__ == "__main__":
    main()
