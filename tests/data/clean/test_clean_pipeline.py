"""The whole refinery: every document accounted for, resume after an interruption, parallel = serial."""

import json
from pathlib import Path

import pytest
from clean_samples import CHINESE, ENGLISH, JAPANESE

import lmforge.data.clean.pipeline as pipeline
from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.normalize import normalize
from lmforge.data.clean.recipe import NormalizeConfig
from lmforge.data.clean.synthetic import generate
from lmforge.errors import LmforgeError

ENGLISH_2 = (
    "Our team met in the spring to plan the new library building. The architect showed drawings of a bright "
    "reading room with tall windows facing the park, and the board agreed to raise money for it over the next "
    "two years. Questions about the project can be sent to the office at planning@library-example.org, and "
    "the public meeting will be held in the town hall on the first Monday of the month. Everyone is welcome to "
    "attend and to share ideas about the children's corner, the study rooms and the café on the ground floor. "
    "Light refreshments will be served after the meeting."
)
GERMAN = (
    "Die Stadt liegt an einem großen Fluss und ist für ihre alte Brücke bekannt. Im Sommer kommen viele "
    "Besucher, um die Altstadt mit ihren engen Gassen zu sehen. Das Museum zeigt die Geschichte der Region von "
    "der Römerzeit bis heute, und im Herbst gibt es ein großes Fest mit Musik und Theater für die ganze Familie."
)
_SENTENCES = ENGLISH.replace("\n\n", " ").split(". ")
# every line is a sentence and the start of the next one: no line ends with punctuation
NO_LINE_ENDS_PUNCTUATED = "\n".join(f"{a}. {' '.join(b.split()[:3])}" for a, b in zip(_SENTENCES, _SENTENCES[1:]))

# (record, the step that should remove it or None, reason)
CASES = [
    ({"text": ENGLISH}, None, None),
    ({"text": CHINESE}, None, None),
    ({"text": JAPANESE}, "langid", "other_language:ja"),
    ({"text": ENGLISH_2}, None, None),
    ({"text": GERMAN}, "langid", "other_language:de"),
    ({"text": "   \n\t "}, "normalize", "empty"),
    ({"text": "Too short to be a document."}, "gopher_quality", "min_doc_words"),
    ({"text": ENGLISH + " " + " ".join(["buy cheap watches"] * 30)}, "gopher_repetition", "top_2_gram"),
    ({"text": ENGLISH + "\nLorem ipsum dolor sit amet."}, "c4", "lorem_ipsum"),
    ({"text": NO_LINE_ENDS_PUNCTUATED}, "fineweb", "line_punct_ratio"),
    ({"text": ENGLISH.replace(" ", "   ").upper()}, "exact_dedup", "exact_duplicate"),
    ({"text": ENGLISH.replace("castle", "fortress")}, "near_dedup", "near_duplicate"),
    ({"text": CHINESE.replace("首都", "首府")}, "near_dedup", "near_duplicate"),
]


def write_corpus(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for record, _, _ in CASES:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.write("{broken json\n")
        f.write(json.dumps({"title": "no text"}) + "\n")
    return [str(folder / "corpus.jsonl")]


def read_output(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_every_document_is_accounted_for(tmp_path):
    inputs = write_corpus(tmp_path / "raw")
    recipe = load_recipe(langid={"languages": ["en", "zh"]})
    stats = clean(inputs, tmp_path / "out", recipe)

    expected_removed = {}
    for _, step, reason in CASES:
        if step:
            expected_removed.setdefault(step, {}).setdefault(reason, 0)
            expected_removed[step][reason] += 1
    for name, step in stats["steps"].items():
        assert step["reasons"] == expected_removed.get(name, {}), name
        assert step["docs_removed"] == sum(step["reasons"].values())
        assert len(step["samples"]) == step["docs_removed"]  # nothing is dropped without a trace
    assert stats["docs_read"] == len(CASES) == stats["docs_out"] + stats["docs_removed"]
    assert stats["accounting_ok"]
    steps = list(stats["steps"].values())
    for before, after in zip(steps, steps[1:]):  # each step hands on exactly what it kept
        assert before["docs_out"] == after["docs_in"] and before["chars_out"] == after["chars_in"]
    assert stats["reader_issues"] == {"malformed_json": 1, "missing_field": 1}
    assert stats["pii_replaced"] == {"email": 1}
    assert stats["dedup"]["verified_pairs"] == 2 and stats["dedup"]["near_duplicate_clusters"] == 2

    kept = read_output(tmp_path / "out")
    nfkc = NormalizeConfig()  # NFKC, Chinese punctuation kept
    assert [r["text"] for r in kept] == [ENGLISH, normalize(CHINESE, nfkc),
                                         ENGLISH_2.replace("planning@library-example.org", "<EMAIL>")]
    assert [r["lang"] for r in kept] == ["en", "zh", "en"]
    assert stats["docs_out"] == len(kept) and stats["chars_out"] == sum(len(r["text"]) for r in kept)
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk["complete"] and on_disk["docs_out"] == 3
    assert {p for p in stats["plots"]} == {"plots/lengths.png", "plots/lang_score.png", "plots/removed.png"}
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in stats["plots"])
    assert not (tmp_path / "out" / "_work").exists()


def test_output_feeds_data_prepare(tmp_path):
    from lmforge.data.corpora import iter_documents

    stats = clean(write_corpus(tmp_path / "raw"), tmp_path / "out", load_recipe())
    documents = list(iter_documents(str(tmp_path / "out")))
    assert len(documents) == stats["docs_out"] and ENGLISH in documents


def small_shards_recipe(**overrides):
    return load_recipe(reader={"shard_bytes": 20_000}, output={"plots": False}, **overrides)


def synthetic_inputs(folder: Path, n_docs: int = 120) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = generate(n_docs, duplicate_share=0.3, chinese_share=0.3, seed=5, paragraphs=(2, 4))
    with open(folder / "synthetic.jsonl", "w") as f:
        for text in corpus.texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return [str(folder / "synthetic.jsonl")]


def test_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    inputs = synthetic_inputs(tmp_path / "raw")
    recipe = small_shards_recipe()
    reference = clean(inputs, tmp_path / "reference", recipe)
    assert reference["inputs"]["shards"] >= 5

    real = pipeline._clean_shard
    calls = []

    def interrupted(shard):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(shard.index)
        return real(shard)

    monkeypatch.setattr(pipeline, "_clean_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clean(inputs, tmp_path / "out", recipe)
    out = tmp_path / "out"
    assert not (out / "stats.json").exists() and not list(out.glob("part-*"))  # nothing looks complete
    assert len(list((out / "_work" / "stage1").glob("*.stats.json"))) == 3

    calls.clear()
    monkeypatch.setattr(pipeline, "_clean_shard", lambda shard: calls.append(shard.index) or real(shard))
    resumed = clean(inputs, out, recipe)
    assert len(calls) == reference["inputs"]["shards"] - 3  # only the unfinished shards ran again
    assert read_output(out) == read_output(tmp_path / "reference")
    for key in ("docs_read", "docs_out", "chars_out", "steps", "dedup", "reader_issues"):
        assert resumed[key] == reference[key], key

    calls.clear()  # a finished run is not redone
    assert clean(inputs, out, recipe)["finished_at"] == resumed["finished_at"] and calls == []


def test_another_recipe_in_the_same_out_needs_overwrite(tmp_path):
    inputs = synthetic_inputs(tmp_path / "raw", 20)
    clean(inputs, tmp_path / "out", small_shards_recipe())
    other = small_shards_recipe(dedup={"threshold": 0.9})
    with pytest.raises(LmforgeError, match="--overwrite"):
        clean(inputs, tmp_path / "out", other)
    assert clean(inputs, tmp_path / "out", other, overwrite=True)["dedup"]["threshold"] == 0.9


@pytest.mark.slow  # two spawned workers each import torch through lmforge/__init__ (~3-5 s on this machine)
def test_two_workers_give_the_same_output_as_one(tmp_path):
    inputs = synthetic_inputs(tmp_path / "raw", 80)
    recipe = small_shards_recipe()
    serial = clean(inputs, tmp_path / "serial", recipe, workers=1)
    parallel = clean(inputs, tmp_path / "parallel", recipe, workers=2)
    assert serial["inputs"]["shards"] >= 4
    assert read_output(tmp_path / "parallel") == read_output(tmp_path / "serial")
    assert parallel["steps"] == serial["steps"] and parallel["docs_out"] == serial["docs_out"] > 0


def test_the_same_pipeline_runs_on_a_dask_cluster(tmp_path):
    """A Dask cluster given by its scheduler address (here: in-process workers, to start fast)."""
    from dask.distributed import LocalCluster

    inputs = synthetic_inputs(tmp_path / "raw", 80)
    recipe = small_shards_recipe()
    serial = clean(inputs, tmp_path / "serial", recipe, workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        on_dask = clean(inputs, tmp_path / "dask", recipe, engine="dask", scheduler=cluster.scheduler_address)
        assert len(cluster.workers) == 2
    assert serial["inputs"]["shards"] >= 4
    assert read_output(tmp_path / "dask") == read_output(tmp_path / "serial")
    assert on_dask["steps"] == serial["steps"] and on_dask["accounting_ok"]


@pytest.mark.slow  # a local cluster of worker processes, each importing torch through lmforge/__init__
def test_dask_engine_starts_a_local_cluster_of_processes(tmp_path):
    inputs = synthetic_inputs(tmp_path / "raw", 40)
    recipe = small_shards_recipe()
    on_dask = clean(inputs, tmp_path / "dask", recipe, workers=1, engine="dask")
    serial = clean(inputs, tmp_path / "serial", recipe, workers=1)
    assert read_output(tmp_path / "dask") == read_output(tmp_path / "serial") and on_dask["docs_out"] > 0


def test_a_bad_recipe_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  gopher_quality: {}\n  perplexity: {}\n")
    with pytest.raises(LmforgeError, match="unknown filter 'perplexity'"):
        load_recipe(bad)
    bad.write_text("dedup:\n  bandz: 3\n")
    with pytest.raises(LmforgeError, match=r"dedup\.bandz: unknown key"):
        load_recipe(bad)
    bad.write_text("normalize: {unicode_form: NFX}\n")
    with pytest.raises(LmforgeError, match="normalize.unicode_form"):
        load_recipe(bad)
    with pytest.raises(LmforgeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_recipe_names_only_what_it_changes(tmp_path):
    path = tmp_path / "clean.yaml"
    path.write_text("langid: {languages: [en, zh]}\nfilters:\n  gopher_quality: {min_doc_words: 20}\n")
    recipe = load_recipe(path)
    assert recipe.langid.languages == ["en", "zh"] and recipe.langid.min_score == 0.65
    assert list(recipe.filters) == ["gopher_quality"]  # a filters section lists the filters that run
    assert recipe.dedup.bands == 14 and recipe.dedup.rows == 8
    assert load_recipe(langid={"languages": "en, zh"}).langid.languages == ["en", "zh"]  # as --languages gives it
    assert list(load_recipe("books").filters) == ["boilerplate", "gopher_quality"]  # a preset shipped with the package


def test_memory_stays_bounded_as_the_corpus_grows(tmp_path):
    """Peak Python allocations barely move when the corpus is four times larger (streaming)."""
    import tracemalloc

    recipe = load_recipe(filters={}, langid={"enabled": False}, pii={"enabled": False},
                         reader={"shard_bytes": 2**20}, output={"plots": False})
    peaks, sizes = [], []
    for n_docs in (20, 150, 600):  # the first run only warms up imports and caches
        folder = tmp_path / str(n_docs)
        corpus = generate(n_docs, duplicate_share=0.1, chinese_share=0.2, seed=n_docs, paragraphs=(8, 12))
        folder.mkdir()
        with open(folder / "c.jsonl", "w") as f:
            for text in corpus.texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        sizes.append((folder / "c.jsonl").stat().st_size)
        tracemalloc.start()
        stats = clean([str(folder / "c.jsonl")], folder / "out", recipe)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert stats["docs_out"] > 0 and stats["accounting_ok"]
    assert sizes[2] > 2 * 2**20 and sizes[2] > 3.5 * sizes[1]
    assert peaks[2] < sizes[2] * 0.75  # below the corpus size: documents stream through
    # 4x the corpus adds well under 10% of the added bytes (dedup keeps ~130 bytes a document)
    assert peaks[2] - peaks[1] < 0.1 * (sizes[2] - sizes[1])
