"""Readers: formats, shards, bad input counted (never raised), bounded memory."""

import gzip
import json
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.clean.readers import discover, plan_shards, read_shard
from lmforge.data.clean.recipe import ReaderConfig
from lmforge.errors import LmforgeError

READER = ReaderConfig()


def read_all(inputs, config=READER, shard_bytes=None):
    files, skipped = discover([str(i) for i in inputs])
    issues = Counter()
    docs = [d for s in plan_shards(files, shard_bytes or config.shard_bytes) for d in read_shard(s, config, issues)]
    return docs, issues, skipped


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def test_every_format_directories_and_globs(tmp_path):
    records = [{"text": f"document {i} 文档"} for i in range(5)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(records))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(records)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(records)))
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), tmp_path / "d.parquet", row_group_size=2)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text("a whole book in one file\n\nsecond paragraph")
    (tmp_path / "notes.csv").write_text("ignored")
    docs, issues, skipped = read_all([tmp_path])
    assert len(docs) == 21 and not issues
    assert skipped == [str(tmp_path / "notes.csv")]
    assert sorted(d.text for d in docs).count("document 3 文档") == 4
    assert any(d.text.startswith("a whole book") for d in docs)
    assert len({d.id for d in docs}) == 21  # ids are unique and stable
    by_glob, _, _ = read_all([tmp_path / "*.jsonl*"])
    assert len(by_glob) == 15


def test_a_byte_order_mark_is_not_a_malformed_line(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl([{"text": "first"}, {"text": "second"}]))
    docs, issues, _ = read_all([tmp_path / "bom.jsonl"])
    assert [d.text for d in docs] == ["first", "second"] and not issues


def test_text_field_is_chosen(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"content": "x y z", "text": 3}]))
    docs, issues, _ = read_all([tmp_path / "a.jsonl"], ReaderConfig(text_field="content"))
    assert [d.text for d in docs] == ["x y z"]
    docs, issues, _ = read_all([tmp_path / "a.jsonl"])
    assert docs == [] and issues == {"not_a_string": 1}


def test_bad_input_is_counted_not_raised(tmp_path):
    lines = (jsonl([{"text": "good one"}]) + b"{not json\n" + jsonl([{"body": "no text field"}, ["a list"]])
             + b'{"text": "bad \xff\xfe bytes"}\n' + b"\n" + jsonl([{"text": ""}, {"text": None}]))
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    packed = gzip.compress(jsonl([{"text": f"gz {i * 7919 % 10007}"} for i in range(1000)]))
    (tmp_path / "broken.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # truncated mid-stream
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    docs, issues, _ = read_all([tmp_path])
    from_gzip = [d for d in docs if d.text.startswith("gz ")]
    assert 0 < len(from_gzip) < 1000  # what came before the break is read, then the file counts as corrupt
    texts = sorted(d.text for d in docs if not d.text.startswith("gz "))
    assert texts == ["", "bad \ufffd\ufffd bytes", "caf\ufffd au lait", "good one"]
    assert issues == {"malformed_json": 1, "missing_field": 2, "not_a_string": 1, "undecodable_bytes": 2,
                      "binary_file": 1, "corrupt_file": 2}


def test_plain_jsonl_splits_into_byte_ranges_reading_each_line_once(tmp_path):
    records = [{"text": f"line {i} " + "x" * (i % 37)} for i in range(2000)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(records))
    files, _ = discover([str(tmp_path / "a.jsonl")])
    shards = plan_shards(files, 4096)
    assert len(shards) > 10
    issues = Counter()
    texts = [d.text for s in shards for d in read_shard(s, READER, issues)]
    assert texts == [r["text"] for r in records] and not issues


def test_parquet_row_groups_become_shards(tmp_path):
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)]}), tmp_path / "d.parquet", row_group_size=10)
    docs, issues, _ = read_all([tmp_path / "d.parquet"], shard_bytes=1)
    assert [d.text for d in docs] == [f"row {i}" for i in range(100)]
    assert docs[42].id.endswith("#42")
    files, _ = discover([str(tmp_path / "d.parquet")])
    assert len(plan_shards(files, 1)) == 10


def test_a_100_mb_line_is_skipped_with_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(jsonl([{"text": "before"}]))
        f.write(b'{"text": "' + b"a" * (100 * 2**20) + b'"}\n')
        f.write(jsonl([{"text": "after"}]))
    tracemalloc.start()
    docs, issues, _ = read_all([path], ReaderConfig(max_doc_chars=100_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [d.text for d in docs] == ["before", "after"]
    assert issues == {"oversized": 1}
    assert peak < 2 * 2**20  # a 400 KB read buffer, not the 100 MB line


def test_oversized_text_files_and_fields(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 1000)
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"text": "é" * 300}, {"text": "ok"}]))
    docs, issues, _ = read_all([tmp_path], ReaderConfig(max_doc_chars=200))
    assert [d.text for d in docs] == ["ok"] and issues == {"oversized": 2}


def test_missing_input_is_one_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="matches no file"):
        discover([str(tmp_path / "nope*.jsonl")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(LmforgeError, match="no readable input"):
        discover([str(tmp_path)])
