"""Cleaning quality on a hand-labelled set: precision and recall of "kept", per language.

    .venv/bin/python benchmarks/clean_quality.py [--recipe RECIPE] [--languages en,zh] [--json out.json]

The set is `tests/data/clean/labelled/{en,zh}.yaml` ("dev": the boilerplate rules and the
choices of thresholds were made while looking at it) and `labelled/holdout/{en,zh}.yaml`
("holdout": written after those choices, to see how they carry): English and Chinese web
documents that a careful person would keep (articles, news, guides, answers; many with
navigation, share bars, related-article blocks and copyright footers around them) or drop
(spam, keyword lists, gibberish, pages of links, fragments, machine-repeated text). Each set
goes through `lmforge data clean` (the whole pipeline, `--languages en,zh` by default) as one
JSONL corpus.

Reported per language:
- precision and recall of "kept" (a kept document is a positive; the label says whether it
  should have been);
- boilerplate: the share of the lines listed under `boilerplate` in kept good documents that
  are gone from the output;
- content: the share of the other lines of kept good documents that are still there.
Every wrong decision is listed with the step and reason (or the boilerplate left behind).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.normalize import normalize
from lmforge.data.clean.pii import scrub

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "clean" / "labelled"


def load_set(folder: Path = LABELLED) -> list[dict]:
    """Every labelled document, with its language (the file's name) filled in."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load(path.read_text(encoding="utf-8")):
            docs.append({**doc, "language": path.stem, "boilerplate": doc.get("boilerplate", [])})
    return docs


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def evaluate(docs: list[dict], recipe, workdir: Path) -> dict:
    """Run the pipeline over `docs`; per language: confusion counts, line retention, mistakes."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "labelled.jsonl"
    by_offset = {}  # lmforge before records kept their ids named documents "<file>@<byte offset>"
    with open(raw, "wb") as f:
        for doc in docs:
            by_offset[f"{raw}@{f.tell()}"] = doc["id"]
            f.write((json.dumps({"id": doc["id"], "text": doc["text"]}, ensure_ascii=False) + "\n").encode())
    stats = clean([str(raw)], workdir / "out", recipe, workers=1, overwrite=True)
    kept = {}
    for part in sorted((workdir / "out").glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            kept[by_offset.get(record["id"], record["id"])] = record
    removed = {by_offset.get(s["id"], s["id"]): (name, s["reason"], s.get("lang"), s.get("lang_score"))
               for name, step in stats["steps"].items() for s in step["samples"]}
    by_language: dict[str, dict] = {}
    for doc in docs:
        result = by_language.setdefault(doc["language"], {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "boilerplate": [0, 0],
                                                            "content": [0, 0], "mistakes": []})
        good, out = doc["label"] == "keep", kept.get(doc["id"])
        key = ("tp" if out else "fn") if good else ("fp" if out else "tn")
        result[key] += 1
        if key == "fn":
            result["mistakes"].append({"id": doc["id"], "error": "good document dropped",
                                       "by": removed.get(doc["id"], ("?", "?", None, None))})
        elif key == "fp":
            result["mistakes"].append({"id": doc["id"], "error": "bad document kept", "lang": out.get("lang")})
        if key != "tp":
            continue
        out_lines = set(_lines(out["text"]))
        boilerplate = {normalize(line, recipe.normalize) for line in doc["boilerplate"]}
        left = sorted(line for line in boilerplate if line in out_lines)
        result["boilerplate"][0] += len(boilerplate) - len(left)
        result["boilerplate"][1] += len(boilerplate)
        content = [scrub(line, recipe.pii)[0] if recipe.pii.enabled else line  # PII is rewritten, not lost
                   for line in _lines(normalize(doc["text"], recipe.normalize)) if line not in boilerplate]
        lost = [line for line in content if line not in out_lines]
        result["content"][0] += len(content) - len(lost)
        result["content"][1] += len(content)
        if left or lost:
            result["mistakes"].append({"id": doc["id"], "error": "lines", "boilerplate_left": left, "content_lost": lost})
    for result in by_language.values():
        tp, fp, fn = result["tp"], result["fp"], result["fn"]
        result["precision"] = tp / (tp + fp) if tp + fp else 1.0
        result["recall"] = tp / (tp + fn) if tp + fn else 1.0
        result["boilerplate_removed"] = result["boilerplate"][0] / max(1, result["boilerplate"][1])
        result["content_kept"] = result["content"][0] / max(1, result["content"][1])
    return by_language


SETS = {"dev": LABELLED, "holdout": LABELLED / "holdout"}


def combine(results: list[dict]) -> dict:
    """Per-language results of several sets added up (mistakes and ratios recomputed)."""
    total: dict[str, dict] = {}
    for by_language in results:
        for language, r in by_language.items():
            acc = total.setdefault(language, {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "boilerplate": [0, 0],
                                              "content": [0, 0], "mistakes": []})
            for key in ("tp", "fp", "fn", "tn"):
                acc[key] += r[key]
            for key in ("boilerplate", "content"):
                acc[key] = [a + b for a, b in zip(acc[key], r[key])]
    for r in total.values():
        r["precision"] = r["tp"] / (r["tp"] + r["fp"]) if r["tp"] + r["fp"] else 1.0
        r["recall"] = r["tp"] / (r["tp"] + r["fn"]) if r["tp"] + r["fn"] else 1.0
        r["boilerplate_removed"] = r["boilerplate"][0] / max(1, r["boilerplate"][1])
        r["content_kept"] = r["content"][0] / max(1, r["content"][1])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None, help="A cleaning recipe YAML or preset (default: the default recipe).")
    parser.add_argument("--languages", default="en,zh", help="langid.languages; 'all' keeps every language.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    languages = None if args.languages == "all" else args.languages
    # every removed document is kept as a sample, so each mistake can name the step that made it
    recipe = load_recipe(args.recipe, langid={"languages": languages}, output={"plots": False, "samples_per_filter": 10_000})
    results = {}
    for name, folder in SETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = evaluate(load_set(folder), recipe, Path(tmp))
    results["all"] = combine(list(results.values()))
    print(f"{'set':<8} {'lang':<5} {'docs':>4} {'good':>4} {'kept':>4} {'precision':>9} {'recall':>6} "
          f"{'boilerplate removed':>19} {'content kept':>12}")
    for name, by_language in results.items():
        for language, r in sorted(by_language.items()):
            n = r["tp"] + r["fp"] + r["fn"] + r["tn"]
            print(f"{name:<8} {language:<5} {n:>4} {r['tp'] + r['fn']:>4} {r['tp'] + r['fp']:>4} {r['precision']:>9.3f} "
                  f"{r['recall']:>6.3f} {r['boilerplate_removed']:>12.3f} ({r['boilerplate'][0]}/{r['boilerplate'][1]}) "
                  f"{r['content_kept']:>6.3f} ({r['content'][0]}/{r['content'][1]})")
    for name in SETS:
        for language, r in sorted(results[name].items()):
            for mistake in r["mistakes"]:
                print(f"  {name} {language} {json.dumps(mistake, ensure_ascii=False)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
