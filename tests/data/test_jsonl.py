"""The one JSON Lines reader: what users' files hold (ids, urls, Chinese text, blank lines) and how bad lines are named."""

import json

import pytest

from lmforge.data.jsonl import json_objects, listed_lines, read_json_objects
from lmforge.errors import LmforgeError

RECORDS = [
    {"id": "web-000017", "url": "https://example.com/zh/pytorch-faq", "text": "在 PyTorch 中使用 torch.compile 可以加速训练。"},
    {"id": "web-000018", "url": "https://example.org/blog?p=42", "text": "Install with `pip install lmforge`."},
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_objects_keep_their_line_numbers_and_fields(tmp_path):
    lines = [json.dumps(RECORDS[0], ensure_ascii=False), "", "   ", json.dumps(RECORDS[1])]
    rows = read_json_objects(_write(tmp_path / "web.jsonl", lines))
    assert rows == [(1, RECORDS[0]), (4, RECORDS[1])]
    assert list(json_objects(lines, "web.jsonl")) == rows


@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": 1, "text": "unterminated', r"web\.jsonl:2 is not valid JSON \(Unterminated string"),
    ('["a", "list"]', r"web\.jsonl:2 is a JSON list, not an object"),
    ('"just a string"', r"web\.jsonl:2 is a JSON str, not an object"),
])
def test_streaming_reader_stops_at_the_first_bad_line_naming_it(line, problem):
    lines = [json.dumps(RECORDS[0], ensure_ascii=False), line, "{not even close"]
    seen = []
    with pytest.raises(LmforgeError, match=problem + r".*each line must be one JSON object"):
        for number, obj in json_objects(lines, "web.jsonl"):
            seen.append(number)
    assert seen == [1]  # what came before the bad line was delivered, nothing after it


def test_whole_file_reader_lists_every_bad_line(tmp_path):
    lines = [json.dumps(RECORDS[1])] + ["{broken"] * 8 + ["[1, 2]"]
    with pytest.raises(LmforgeError, match=r"9 malformed JSONL lines 2, 3, 4, 5, 6 \(and 4 more\) "
                                           r"\(not valid JSON .*\); each line must be one JSON object"):
        read_json_objects(_write(tmp_path / "sft.jsonl", lines))


def test_missing_and_non_utf8_files_are_one_line_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"^data file .*nowhere\.jsonl not found$"):
        read_json_objects(tmp_path / "nowhere.jsonl")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(LmforgeError, match=r"latin1\.jsonl is not UTF-8 text"):
        read_json_objects(latin)


def test_listed_lines_reads_naturally():
    assert listed_lines([7]) == "line 7"
    assert listed_lines([2, 3]) == "lines 2, 3"
    assert listed_lines(list(range(1, 9))) == "lines 1, 2, 3, 4, 5 (and 3 more)"
