"""The refinery: read → normalize → langid → filters → PII → decontaminate → dedup → write.

Three stages, all restartable:

1. per shard, in a pool of worker processes: every step that looks at one document at a
   time. A worker writes the kept documents, their MinHash signatures and exact-content
   hashes to `out/_work/`, and last its stats file, which marks the shard as done;
2. once, in this process: exact and near-duplicate clustering over all signatures;
3. per shard: the survivors are copied into `out/part-NNNNN.jsonl`, each written to a
   temporary name and renamed. `stats.json` is written last, so an output directory
   without it is an unfinished run, never a complete-looking partial one.

A re-run with the same inputs and recipe skips the shards already done (after a crash or
Ctrl-C); with a different recipe it refuses unless asked to overwrite.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import multiprocessing
import os
import shutil
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.clean import langid as langid_mod
from lmforge.data.clean.decontaminate import eval_ngrams, is_contaminated
from lmforge.data.clean.dedup import EXACT, KEEP, deduplicate, exact_key
from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import build_filters
from lmforge.data.clean.minhash import MinHasher
from lmforge.data.clean.normalize import normalize
from lmforge.data.clean.pii import scrub
from lmforge.data.clean.readers import Shard, discover, plan_shards, read_shard
from lmforge.data.clean.recipe import CleanRecipe
from lmforge.data.clean.stats import ShardStats, length_bin, merge, score_bin
from lmforge.errors import LmforgeError

WORK = "_work"
STATS_FILE = "stats.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def stage1_steps(recipe: CleanRecipe) -> list[str]:
    steps = ["normalize"]
    if recipe.langid.enabled:
        steps.append("langid")
    steps += [f.name for f in build_filters(recipe.filters)]
    if recipe.pii.enabled:
        steps.append("pii")
    if recipe.decontaminate.eval_files:
        steps.append("decontaminate")
    return steps


def dedup_steps(recipe: CleanRecipe) -> list[str]:
    return [name for name, on in (("exact_dedup", recipe.dedup.exact), ("near_dedup", recipe.dedup.near)) if on]


# ---------------------------------------------------------------- stage 1: one shard, in a worker


def output_record(doc: Document, text_field: str) -> dict:
    """The input record with its text cleaned; `id`, `lang`, `lang_score` added only where it has none."""
    record = dict(doc.record) if doc.record is not None else {}
    record[text_field] = doc.text
    if record.get("id") is None:
        record["id"] = doc.id
    if doc.language is not None:
        record.setdefault("lang", doc.language)
        record.setdefault("lang_score", round(doc.language_score, 4))
    return record


def _json_value(value):
    """JSON for the Parquet types JSON lacks: dates and times as ISO text, bytes as UTF-8 or base64."""
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return str(value)  # Decimal and the like: their exact text


@dataclass
class _Worker:
    recipe: CleanRecipe
    work: Path
    filters: list
    hasher: MinHasher
    grams: np.ndarray


_WORKER: _Worker | None = None


def _init_worker(recipe_dict: dict, work: str) -> None:
    global _WORKER
    recipe = CleanRecipe.model_validate(recipe_dict)
    grams_path = Path(work) / "decontaminate.npy"
    grams = np.load(grams_path) if grams_path.exists() else np.zeros(0, dtype=np.uint64)
    hasher = MinHasher(recipe.dedup.bands * recipe.dedup.rows, recipe.dedup.ngram, recipe.dedup.seed)
    _WORKER = _Worker(recipe, Path(work), build_filters(recipe.filters), hasher, grams)


def clean_shard_on_worker(shard: Shard, recipe_dict: dict, work: str) -> tuple[int, dict]:
    """(shard index, stats) of stage 1 on a worker that outlives one run (a Dask worker): its
    filters and hasher are built once per process and run, not once per shard."""
    state = _WORKER
    if state is None or str(state.work) != work or state.recipe.model_dump(mode="json") != recipe_dict:
        _init_worker(recipe_dict, work)
    return shard.index, _clean_shard(shard)


def _shard_paths(work: Path, index: int) -> dict[str, Path]:
    base = work / "stage1" / f"shard-{index:05d}"
    return {"kept": base.with_suffix(".kept"), "signatures": base.with_suffix(".sig"), "hashes": base.with_suffix(".hash"),
            "stats": base.with_suffix(".stats.json")}


def _clean_shard(shard: Shard) -> dict:
    """Stage 1 for one shard; returns its stats (also written to disk, marking it done)."""
    w = _WORKER
    recipe = w.recipe
    steps = stage1_steps(recipe)
    stats = ShardStats(steps + dedup_steps(recipe), recipe.output.samples_per_filter)
    paths = _shard_paths(w.work, shard.index)
    hashes = array("Q")  # 8 bytes a document; signatures go straight to disk
    tmp = {name: path.with_name(path.name + ".tmp") for name, path in paths.items()}
    with open(tmp["kept"], "w", encoding="utf-8") as out, open(tmp["signatures"], "wb") as signature_file:
        for doc in read_shard(shard, recipe.reader, stats.reader_issues):
            original = doc.text
            stats.read(len(original))
            step = "normalize"
            try:
                doc.text = normalize(original, recipe.normalize)
                if not doc.text.strip():
                    stats.removed(step, "empty", doc.id, original, len(original))
                    continue
                stats.passed(step, len(original), len(doc.text))
                if recipe.langid.enabled:
                    step = "langid"
                    langid_mod.label(doc, recipe.langid.max_chars)
                    stats.languages[doc.language] += 1
                    stats.hist["lang_score"][score_bin(doc.language_score)] += 1
                    reason = langid_mod.keep(doc, recipe.langid.languages, recipe.langid.min_score)
                    if reason is not None:
                        stats.removed(step, f"{reason}:{doc.language}" if reason == "other_language" else reason,
                                      doc.id, doc.text, len(doc.text), doc.language, doc.language_score)
                        continue
                    stats.passed(step, len(doc.text), len(doc.text))
                dropped = False
                for quality_filter in w.filters:
                    step = quality_filter.name
                    before = len(doc.text)
                    reason = quality_filter.apply(doc)
                    if reason is not None:
                        stats.removed(step, reason, doc.id, doc.text, before, doc.language, doc.language_score)
                        dropped = True
                        break
                    stats.passed(step, before, len(doc.text))
                    if doc.removed_lines:
                        stats.lines_removed(step, doc.id, doc.removed_lines)
                    doc.removed_lines.clear()
                if dropped:
                    continue
                if recipe.pii.enabled:
                    step = "pii"
                    before = len(doc.text)
                    doc.text, found = scrub(doc.text, recipe.pii)
                    stats.pii.update(found)
                    stats.passed(step, before, len(doc.text))
                if recipe.decontaminate.eval_files:
                    step = "decontaminate"
                    if is_contaminated(doc.text, w.grams, recipe.decontaminate.ngram):
                        stats.removed(step, "eval_ngram_overlap", doc.id, doc.text, len(doc.text), doc.language,
                                      doc.language_score)
                        continue
                    stats.passed(step, len(doc.text), len(doc.text))
                step = "dedup_signature"
                signature = w.hasher.signature(doc.text) if recipe.dedup.near else None
                content_hash = exact_key(doc.text)
                line = json.dumps(output_record(doc, recipe.reader.text_field), ensure_ascii=False,
                                  default=_json_value) + "\n"
            except Exception as exc:  # noqa: BLE001 - one bad document must not stop the run
                stats.removed(step if step in stats.steps else steps[-1], f"error:{type(exc).__name__}", doc.id,
                              doc.text, len(doc.text), doc.language, doc.language_score)
                continue
            out.write(line)
            if signature is not None:
                signature_file.write(signature.tobytes())
            hashes.append(content_hash)
    tmp["hashes"].write_bytes(hashes.tobytes())
    for name in ("kept", "signatures", "hashes"):
        os.replace(tmp[name], paths[name])
    result = stats.to_dict()
    _atomic_write_text(paths["stats"], json.dumps(result, ensure_ascii=False))  # the "done" marker, last
    return result


# ---------------------------------------------------------------- the run


def _plan(inputs: list[str], recipe: CleanRecipe) -> tuple[list[Shard], dict]:
    files, skipped = discover(inputs)
    shards = plan_shards(files, recipe.reader.shard_bytes)
    fingerprint = {
        "recipe": recipe.model_dump(mode="json"),
        "files": [[path, os.path.getsize(path), os.path.getmtime(path)] for path, _, _ in files],
        "shards": len(shards),
    }
    return shards, {"fingerprint": fingerprint, "skipped_files": skipped,
                    "bytes": sum(os.path.getsize(path) for path, _, _ in files), "files": len(files)}


def _prepare_out(out: Path, plan: dict, overwrite: bool) -> bool:
    """Create or check the output directory; True when a finished identical run is already there."""
    work = out / WORK
    plan_file = work / "plan.json"
    stats_file = out / STATS_FILE
    if overwrite:
        for stale in [*out.glob("part-*.jsonl"), *out.glob("part-*.jsonl.tmp"), stats_file]:
            stale.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
    if stats_file.exists():
        finished = json.loads(stats_file.read_text())
        if finished.get("fingerprint") == plan["fingerprint"] and finished.get("complete"):
            return True
        raise LmforgeError(f"{out} holds a finished run of other inputs or another recipe; "
                           "pass --overwrite or choose another --out")
    if plan_file.exists():
        if json.loads(plan_file.read_text()) != plan["fingerprint"]:
            raise LmforgeError(f"{out} holds an unfinished run of other inputs or another recipe; "
                               "pass --overwrite to discard it or choose another --out")
    else:
        (work / "stage1").mkdir(parents=True, exist_ok=True)
        _atomic_write_text(plan_file, json.dumps(plan["fingerprint"]))
    (work / "stage1").mkdir(parents=True, exist_ok=True)
    return False


def _run_stage1(shards: list[Shard], recipe: CleanRecipe, work: Path, workers: int,
                on_progress: Callable[[int, int], None] | None, engine: str, scheduler: str | None) -> list[dict]:
    results: dict[int, dict] = {}
    todo = []
    for shard in shards:
        stats_path = _shard_paths(work, shard.index)["stats"]
        if stats_path.exists():
            results[shard.index] = json.loads(stats_path.read_text())
        else:
            todo.append(shard)
    if on_progress:
        on_progress(len(results), len(shards))
    if recipe.decontaminate.eval_files and not (work / "decontaminate.npy").exists():
        tmp = work / "tmp-decontaminate.npy"
        np.save(tmp, eval_ngrams(recipe.decontaminate))
        os.replace(tmp, work / "decontaminate.npy")
    init_args = (recipe.model_dump(mode="json"), str(work))
    if engine == "dask" and todo:
        from lmforge.data.clean.dask_engine import run_on_dask

        for index, result in run_on_dask(clean_shard_on_worker, todo, init_args, workers, scheduler):
            results[index] = result
            if on_progress:
                on_progress(len(results), len(shards))
    elif workers <= 1 or len(todo) <= 1:
        _init_worker(*init_args)
        for shard in todo:
            results[shard.index] = _clean_shard(shard)
            if on_progress:
                on_progress(len(results), len(shards))
    else:
        context = multiprocessing.get_context("spawn")  # fork is unsafe with threads (torch, BLAS)
        pool = context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=init_args)
        try:
            for shard, result in zip(todo, pool.imap(_clean_shard, todo)):
                results[shard.index] = result
                if on_progress:
                    on_progress(len(results), len(shards))
            pool.close()
        except BaseException:
            pool.terminate()  # finished shards stay marked; the next run resumes from them
            raise
        finally:
            pool.join()
    return [results[shard.index] for shard in shards]


def _run_dedup(shards: list[Shard], recipe: CleanRecipe, work: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    verdict_path = work / "dedup.npz"
    if verdict_path.exists():
        saved = np.load(verdict_path)
        return saved["verdict"], saved["cluster_size"], json.loads(str(saved["summary"]))
    hashes = np.concatenate([np.fromfile(_shard_paths(work, shard.index)["hashes"], dtype=np.uint64)
                             for shard in shards]) if shards else np.zeros(0, np.uint64)
    num_perm = recipe.dedup.bands * recipe.dedup.rows
    signature_file = work / "signatures.u32"
    signatures = np.zeros((0, num_perm), np.uint32)
    if recipe.dedup.near and len(hashes):
        with open(signature_file, "wb") as sink:  # one file, memory-mapped: rows are read on demand
            for shard in shards:
                with open(_shard_paths(work, shard.index)["signatures"], "rb") as source:
                    shutil.copyfileobj(source, sink)
        signatures = np.memmap(signature_file, dtype=np.uint32, mode="r", shape=(len(hashes), num_perm))
    d = recipe.dedup
    result = deduplicate(signatures, hashes, exact=d.exact, near=d.near, bands=d.bands, rows=d.rows, threshold=d.threshold)
    del signatures
    signature_file.unlink(missing_ok=True)
    clusters = result.cluster_size[result.verdict == KEEP]
    summary = {"candidate_pairs": int(result.candidate_pairs), "verified_pairs": int(len(result.verified_pairs)),
               "near_duplicate_clusters": int((clusters > 1).sum()),
               "largest_cluster": int(result.cluster_size.max()) if len(clusters) else 0,
               "bands": d.bands, "rows": d.rows, "threshold": d.threshold}
    tmp = work / "tmp-dedup.npz"
    np.savez(tmp, verdict=result.verdict, cluster_size=result.cluster_size, summary=json.dumps(summary))
    os.replace(tmp, verdict_path)
    return result.verdict, result.cluster_size, summary


def _write_outputs(shards: list[Shard], recipe: CleanRecipe, out: Path, verdict: np.ndarray,
                   stats: ShardStats) -> list[str]:
    """Stage 3: copy the surviving lines into part files; count the dedup steps as we go."""
    steps = dedup_steps(recipe)
    text_field = recipe.reader.text_field
    parts = []
    row = 0
    for shard in shards:
        kept_path = _shard_paths(out / WORK, shard.index)["kept"]
        part = out / f"part-{len(parts):05d}.jsonl"
        tmp = part.with_name(part.name + ".tmp")
        written = 0
        with open(kept_path, encoding="utf-8") as source, open(tmp, "w", encoding="utf-8") as sink:
            for line in source:
                decision = verdict[row]
                row += 1
                text = None
                if decision != KEEP or steps:
                    record = json.loads(line)
                    text = record[text_field]
                    for step in steps:
                        removed_here = (decision == EXACT) if step == "exact_dedup" else (decision != KEEP)
                        if removed_here:
                            reason = "exact_duplicate" if decision == EXACT else "near_duplicate"
                            stats.removed(step, reason, str(record["id"]), text, len(text))
                            break
                        stats.passed(step, len(text), len(text))
                if decision == KEEP:
                    sink.write(line)
                    written += 1
                    stats.hist["chars_out"][length_bin(len(text if text is not None else json.loads(line)[text_field]))] += 1
        if written:
            os.replace(tmp, part)
            parts.append(part.name)
        else:
            tmp.unlink()
    return parts


def clean(inputs: list[str], out: str | Path, recipe: CleanRecipe, *, workers: int = 1, overwrite: bool = False,
          on_progress: Callable[[int, int], None] | None = None, engine: str = "local",
          scheduler: str | None = None) -> dict:
    """Clean `inputs` into `out/part-*.jsonl` + `out/stats.json`; returns the stats.

    `engine="local"` cleans shards in `workers` local processes; `engine="dask"` on a Dask
    cluster (`scheduler` address, or a local cluster of `workers` processes when None).
    """
    if engine not in ("local", "dask"):
        raise LmforgeError(f"unknown engine '{engine}': use 'local' or 'dask'")
    from lmforge.data.clean.report import finish_stats, write_plots

    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, plan = _plan(inputs, recipe)
    if _prepare_out(out, plan, overwrite):
        return json.loads((out / STATS_FILE).read_text())
    work = out / WORK
    shard_stats = _run_stage1(shards, recipe, work, workers, on_progress, engine, scheduler)
    verdict, _, dedup_summary = _run_dedup(shards, recipe, work)
    tail = ShardStats(dedup_steps(recipe), recipe.output.samples_per_filter)
    parts = _write_outputs(shards, recipe, out, verdict, tail)
    stats = merge([*shard_stats, tail.to_dict()], recipe.output.samples_per_filter)
    stats = finish_stats(stats, plan, parts, dedup_summary, stage1_steps(recipe) + dedup_steps(recipe),
                         elapsed=time.time() - started)
    stats["plots"] = write_plots(stats, out / "plots") if recipe.output.plots else []
    _atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1, ensure_ascii=False))
    if not recipe.output.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return stats
