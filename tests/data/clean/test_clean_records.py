"""Records keep every input field; one bad record (a lone surrogate) never stops a run."""

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from clean_samples import CHINESE, ENGLISH

from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.normalize import normalize
from lmforge.data.clean.readers import discover, plan_shards, read_shard
from lmforge.data.clean.recipe import NormalizeConfig, ReaderConfig

RECIPE = dict(output={"plots": False}, dedup={"near": False})


def read_output(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_jsonl_records_keep_every_field_and_their_own_id(tmp_path):
    records = [
        {"id": "cc-2024-000017", "url": "https://example.org/history", "source": "commoncrawl",
         "metadata": {"crawl": "CC-MAIN-2024-10", "scores": [0.91, 0.4], "headers": {"lang": "en"}},
         "text": ENGLISH + "\nWe use cookies to improve your experience. Read our privacy policy."},
        {"id": 42, "url": "https://example.cn/beijing", "source": "news", "text": CHINESE},
        {"url": "https://example.org/no-id", "meta": None, "text": ENGLISH.replace("castle", "harbour")},
        {"id": "dropped-1", "url": "https://spam.example", "text": "buy now"},
    ]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stats = clean([str(raw)], tmp_path / "out", load_recipe(**RECIPE))
    kept = read_output(tmp_path / "out")
    lines = raw.read_bytes().splitlines(keepends=True)
    assert [r["id"] for r in kept] == ["cc-2024-000017", 42, f"{raw}@{len(lines[0]) + len(lines[1])}"]
    first, second, third = kept
    # every input field as it was; only the text is the cleaned text (the cookie line is gone)
    assert {k: v for k, v in first.items() if k not in ("text", "lang", "lang_score")} == {
        k: v for k, v in records[0].items() if k != "text"}
    assert first["text"] == ENGLISH
    assert second["source"] == "news" and second["url"] == "https://example.cn/beijing"
    assert second["text"] == normalize(CHINESE, NormalizeConfig())
    assert third["meta"] is None and third["url"] == "https://example.org/no-id"
    assert [r["lang"] for r in kept] == ["en", "zh", "en"]
    # a removed document is traced by its own id in the report
    samples = [s for step in stats["steps"].values() for s in step["samples"]]
    assert [s["id"] for s in samples] == ["dropped-1"]


def test_input_fields_are_never_overwritten(tmp_path):
    """`lang`/`lang_score` are ours only where the record has none, like `id`."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": None, "lang": "en-GB", "content": ENGLISH, "text": "a title"}) + "\n")
    clean([str(raw)], tmp_path / "out", load_recipe(reader={"text_field": "content"}, **RECIPE))
    [record] = read_output(tmp_path / "out")
    assert record["lang"] == "en-GB" and record["lang_score"] > 0.9
    assert record["text"] == "a title" and record["content"] == ENGLISH  # the text stays in its own field
    assert record["id"] == f"{raw}@0"  # a null id is no id


def test_parquet_rows_keep_every_column(tmp_path):
    table = pa.table({
        "doc_id": ["a", "b"],
        "text": [ENGLISH, ENGLISH.replace("river", "lake")],
        "crawl_date": [dt.date(2024, 3, 1), dt.date(2024, 3, 2)],
        "tags": [["history", "city"], []],
        "raw": [b"\x89PNG", b"plain"],
        "extra": [{"words": 120, "ok": True}, None],
    })
    pq.write_table(table, tmp_path / "web.parquet")
    clean([str(tmp_path / "web.parquet")], tmp_path / "out", load_recipe(**RECIPE))
    kept = read_output(tmp_path / "out")
    assert [r["doc_id"] for r in kept] == ["a", "b"]
    assert kept[0]["crawl_date"] == "2024-03-01" and kept[0]["tags"] == ["history", "city"]
    assert kept[0]["raw"] == "iVBORw==" and kept[1]["raw"] == "plain"  # bytes: UTF-8 text, else base64
    assert kept[0]["extra"] == {"words": 120, "ok": True} and kept[1]["extra"] is None
    assert kept[0]["id"] == f"{tmp_path / 'web.parquet'}#0"  # no `id` column: ours is added


# ------------------------------------------------------------------ lone surrogates (issue 17)

def _json_string_body(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


ESCAPED = (b'{"id": "esc", "url": "https://example.org/\\ud800", "text": "' + _json_string_body(ENGLISH)
           + b' \\ud800 end."}\n')
RAW_BYTES = b'{"id": "raw", "text": "' + _json_string_body(ENGLISH.replace("river", "lake")) + b' \xed\xa0\x80 end."}\n'
PAIR = json.dumps({"id": "pair", "text": ENGLISH.replace("river", "sea") + " \U0001F600 end."}).encode() + b"\n"


def test_lone_surrogates_are_repaired_and_counted_never_raised(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(ESCAPED + RAW_BYTES + PAIR)
    files, _ = discover([str(tmp_path)])
    issues = Counter()
    docs = [d for s in plan_shards(files, 1 << 20) for d in read_shard(s, ReaderConfig(), issues)]
    assert [d.id for d in docs] == ["esc", "raw", "pair"]
    assert issues == {"lone_surrogates": 2}  # an escaped pair (the emoji) is one valid character
    assert docs[0].text.endswith(" \ufffd end.") and docs[0].record["url"] == "https://example.org/\ufffd"
    assert docs[1].text.endswith(" \ufffd end.")
    assert docs[2].text.endswith(" \U0001F600 end.")
    for doc in docs:
        json.dumps(doc.record, ensure_ascii=False).encode("utf-8")  # writable as UTF-8


def test_a_lone_surrogate_never_stops_the_run_and_the_rerun_finishes(tmp_path):
    """JSONL with the escape and with raw bytes, and a text file with the raw bytes: every document is
    written; running the same command again resumes a finished run without a crash."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_bytes(ESCAPED + RAW_BYTES + PAIR)
    (tmp_path / "raw" / "b.txt").write_bytes(CHINESE.encode() + b"\n\xed\xa0\x80\n" + "这是最后一句话。".encode())
    recipe = load_recipe(**RECIPE)
    stats = clean([str(tmp_path / "raw")], tmp_path / "out", recipe)
    kept = read_output(tmp_path / "out")
    assert sorted(str(r["id"]) for r in kept) == sorted(["esc", "raw", "pair", str(tmp_path / "raw" / "b.txt")])
    assert stats["reader_issues"] == {"lone_surrogates": 2, "undecodable_bytes": 1}
    assert stats["docs_read"] == 4 and stats["docs_out"] == 4 and stats["accounting_ok"]
    text_file = next(r for r in kept if str(r["id"]).endswith("b.txt"))
    assert text_file["text"].endswith("\n这是最后一句话。")  # (the line of U+FFFD alone was dropped by c4)
    again = clean([str(tmp_path / "raw")], tmp_path / "out", recipe)
    assert again["docs_out"] == 4
