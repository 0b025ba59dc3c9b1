"""The default recipe on the hand-labelled English and Chinese pages (benchmarks/clean_quality.py):
good pages kept, bad ones dropped, page furniture gone from the kept ones, their text intact."""

import importlib.util
from pathlib import Path

from lmforge.data.clean import load_recipe

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "clean_quality.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("clean_quality", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_labelled_set_is_what_it_says():
    bench = _benchmark()
    for name, folder in bench.SETS.items():
        docs = bench.load_set(folder)
        for language in ("en", "zh"):
            mine = [d for d in docs if d["language"] == language]
            keep = [d for d in mine if d["label"] == "keep"]
            assert len(mine) >= (40 if name == "dev" else 12) and len(keep) >= len(mine) // 3, (name, language)
            assert all(d["label"] in ("keep", "drop") for d in mine)
            for doc in keep:  # every listed boilerplate line is a line of the page
                lines = {line.strip() for line in doc["text"].split("\n")}
                assert set(doc["boilerplate"]) <= lines, doc["id"]
        assert len({d["id"] for d in docs}) == len(docs)


def test_default_recipe_meets_the_targets_in_both_languages(tmp_path):
    bench = _benchmark()
    recipe = load_recipe(langid={"languages": "en,zh"}, output={"plots": False, "samples_per_filter": 10_000})
    results = bench.combine([bench.evaluate(bench.load_set(folder), recipe, tmp_path / name)
                             for name, folder in bench.SETS.items()])
    assert set(results) == {"en", "zh"}
    for language, r in results.items():
        mistakes = [m for m in r["mistakes"] if m["error"] != "lines"]
        assert r["recall"] >= 0.95 and r["precision"] >= 0.9, (language, mistakes)
        assert r["boilerplate_removed"] >= 0.9, (language, r["boilerplate"])
        assert r["content_kept"] >= 0.95, (language, r["content"])
