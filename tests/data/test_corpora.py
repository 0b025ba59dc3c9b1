"""Where text comes from: the synthetic corpus, and the user's files, directories, globs and JSONL."""

from __future__ import annotations

import gzip
import json

import pytest

from lmforge.data.corpora import iter_documents, resolve_files, strip_gutenberg, synthetic_documents
from lmforge.errors import LmforgeError


def test_synthetic_corpus_is_deterministic_and_offline():
    docs = list(iter_documents("synthetic"))
    assert docs == list(synthetic_documents())
    assert len(docs) == 400 and all(d.startswith("Chapter ") and d.endswith("\n") for d in docs)
    assert list(synthetic_documents(5, seed=1)) != list(synthetic_documents(5, seed=2))


def test_directory_is_read_recursively_in_order_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert list(iter_documents(str(tmp_path))) == ["first", "second", "third", "fourth"]
    assert [p.name for p in resolve_files(str(tmp_path / "**" / "*.md"))] == ["two.md"]


def test_jsonl_gz_and_text_field(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "héllo 世界"}) + "\n")
    assert list(iter_documents(str(path), text_field="body")) == ["héllo 世界"]
    with pytest.raises(LmforgeError, match=r"docs.jsonl.gz:1 has no string field 'text'"):
        list(iter_documents(str(path)))


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(LmforgeError, match=r"docs.jsonl:2 is not valid JSON"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_file_is_a_clear_error(tmp_path, name):
    path = tmp_path / name
    text = '{"text": "café"}\n' if name.endswith("jsonl") else "café"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(LmforgeError, match="not UTF-8"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("spec", ["no-such-file.txt", "no-such-dir/*.txt", "EMPTY_DIR"])
def test_missing_corpus_is_a_clear_error(tmp_path, spec):
    (tmp_path / "EMPTY_DIR").mkdir()
    with pytest.raises(LmforgeError, match="not found"):
        resolve_files(str(tmp_path / spec))


def test_gutenberg_header_and_footer_are_stripped():
    text = ("licence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter")
    assert strip_gutenberg(text) == "Body line.\n"
    assert strip_gutenberg("plain text") == "plain text\n"
