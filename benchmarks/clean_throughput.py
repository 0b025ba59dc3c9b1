"""The whole `lmforge data clean` pipeline: MB/s on 1 and 2 worker processes, and peak memory.

    .venv/bin/python benchmarks/clean_throughput.py [--scaling-mb 16] [--memory-mb 128] [--budget-mb 32]

Part 1 (scaling): one corpus of `--scaling-mb` cleaned with the default recipe by 1 and by 2
worker processes; MB/s and the scaling efficiency (speedup / workers).
Part 2 (memory): a corpus of `--memory-mb`, several times the memory budget, cleaned by 2
workers; the peak resident memory of every process is compared with the budget. The budget
counts memory above what the process holds once its imports are done (numpy, pyarrow, the
language-ID model, the tokenizer's code-point table, and torch, which `import lmforge`
loads today), since that part does not depend on the corpus.

Every run is a fresh subprocess so its peak memory is its own. Wall-clock MB/s and the
scaling efficiency need an otherwise idle machine; MB per CPU-second (user + system time
of the run and its workers) is given too, as it moves much less on a shared one. Corpora are built from a
pool of generated paragraphs (English-like and Chinese), so documents differ and few are
duplicates; they are written as JSONL to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark so far (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    from lmforge.data.clean.synthetic import _Writer

    writer = _Writer(seed)
    rng = random.Random(seed)
    pool = [writer.english(1) for _ in range(6000)] + [writer.chinese(1) for _ in range(2000)]
    english, chinese = pool[:6000], pool[6000:]
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            source = chinese if rng.random() < 0.25 else english
            text = "\n\n".join(rng.sample(source, rng.randint(3, 8)))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
    return written


def child(args: argparse.Namespace) -> None:
    """One measured run, in its own process."""
    from lmforge.data.clean import clean, load_recipe
    from lmforge.data.clean.langid import identify
    from lmforge.data.clean.minhash import token_hashes
    from lmforge.data.clean.readers import _corrupt_file_errors

    # what every worker loads whatever the corpus: pyarrow/zstandard, the language-ID model,
    # the code-point table of the MinHash tokenizer
    _corrupt_file_errors()
    identify("warm up the language-ID model")
    token_hashes("warm up")
    baseline = peak_rss_mb()  # the loading transients (model decompression, tables) count as baseline
    recipe = load_recipe(reader={"shard_bytes": args.shard_mb * 2**20}, output={"plots": False})
    start = time.perf_counter()
    cpu_before = _cpu_seconds()
    stats = clean([args.input], args.out, recipe, workers=args.workers, overwrite=True)
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"workers": args.workers, "seconds": elapsed, "cpu_seconds": cpu, "docs_read": stats["docs_read"],
                      "docs_out": stats["docs_out"], "bytes": os.path.getsize(args.input), "baseline_rss_mb": baseline,
                      "parent_peak_rss_mb": self_peak, "worker_peak_rss_mb": children_peak,
                      "accounting_ok": stats["accounting_ok"]}))


def measure(input_path: Path, out: Path, workers: int, shard_mb: int) -> dict:
    command = [sys.executable, __file__, "--child", "--input", str(input_path), "--out", str(out),
               "--workers", str(workers), "--shard-mb", str(shard_mb)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scaling-mb", type=float, default=16)
    parser.add_argument("--memory-mb", type=float, default=128)
    parser.add_argument("--budget-mb", type=float, default=32, help="allowed peak RSS above the import baseline")
    parser.add_argument("--shard-mb", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
              "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "scaling.jsonl"
        write_corpus(corpus, args.scaling_mb, seed=1)
        runs = {w: measure(corpus, tmp / f"out{w}", w, args.shard_mb) for w in (1, 2)}
        one, two = runs[1], runs[2]
        mb = one["bytes"] / 1e6
        report["scaling"] = {
            "corpus_MB": round(mb, 1), "documents": one["docs_read"], "kept": one["docs_out"],
            "MB_per_s_1_worker": round(mb / one["seconds"], 3), "MB_per_s_2_workers": round(mb / two["seconds"], 3),
            "MB_per_cpu_s_1_worker": round(mb / one["cpu_seconds"], 3),
            "MB_per_cpu_s_2_workers": round(mb / two["cpu_seconds"], 3),
            "speedup": round(one["seconds"] / two["seconds"], 2),
            "efficiency": round(one["seconds"] / two["seconds"] / 2, 2),
            "same_output": one["docs_out"] == two["docs_out"],
        }
        print(json.dumps(report["scaling"]), flush=True)
        if args.memory_mb > 0:
            for path in tmp.glob("out*"):
                subprocess.run(["rm", "-rf", str(path)], check=True)
            big = tmp / "memory.jsonl"
            write_corpus(big, args.memory_mb, seed=2)
            run = measure(big, tmp / "big_out", 2, args.shard_mb)
            above = max(run["parent_peak_rss_mb"], run["worker_peak_rss_mb"]) - run["baseline_rss_mb"]
            report["memory"] = {
                "corpus_MB": round(run["bytes"] / 1e6, 1), "documents": run["docs_read"],
                "budget_MB_above_baseline": args.budget_mb,
                "corpus_over_budget": round(run["bytes"] / 1e6 / args.budget_mb, 1),
                "baseline_rss_MB": round(run["baseline_rss_mb"], 1),
                "parent_peak_rss_MB": round(run["parent_peak_rss_mb"], 1),
                "worker_peak_rss_MB": round(run["worker_peak_rss_mb"], 1),
                "peak_above_baseline_MB": round(above, 1), "within_budget": above <= args.budget_mb,
                "MB_per_s_2_workers": round(run["bytes"] / 1e6 / run["seconds"], 3),
                "MB_per_cpu_s": round(run["bytes"] / 1e6 / run["cpu_seconds"], 3),
                "accounting_ok": run["accounting_ok"],
            }
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
