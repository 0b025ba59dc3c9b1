"""Extraction tasks: lenient triple parsing, triple P/R/F1 against hand-computed values, the
task type in task files, constrained decoding under the triples schema, graph export."""

from __future__ import annotations

import json

import pytest

import lmforge
from lmforge.errors import LmforgeError
from lmforge.eval import triples
from lmforge.eval.extract import extract_edges
from lmforge.eval.graph import Edge, from_csv, from_jsonld, read_graph, to_csv, to_jsonld, write_graph
from lmforge.eval.task_file import load_task
from lmforge.eval.tasks import evaluate_task, run_tasks

ADA = {"head": "Ada", "relation": "works_at", "tail": "Acme"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_parse_takes_the_first_json_array_leniently():
    text = 'Sure! Here are the triples:\n```json\n[{"head": "Ada", "relation": "works_at", "tail": "Acme"}, 7,' \
           ' ["张伟", "works_at", "阿里巴巴"], {"head": "", "relation": "x", "tail": "y"}]\n``` [1, 2]'
    assert triples.parse_triples(text) == [("Ada", "works_at", "Acme"), ("张伟", "works_at", "阿里巴巴")]
    assert triples.parse_triples("[broken [] tail") == []  # the first array that decodes
    assert triples.parse_triples('{"head": "Ada"}') is None
    assert triples.parse_triples("no JSON here") is None
    assert triples.parse_triples('[{"head": "Ada", "relation": "works_at"') is None  # cut off


def test_normalisation_case_width_whitespace_relation_spelling_chinese_as_is():
    assert triples.key(("  The  ＡＣＭＥ Corp. ", "Works-At", "Berlin!")) == ("the acme corp", "works_at", "berlin")
    assert triples.key(("Ada", "works at", "Acme")) == triples.key(("ada", "WORKS_AT", "acme"))
    assert triples.key(("阿里巴巴集团", "r", "x")) != triples.key(("阿里巴巴", "r", "x"))  # no segmentation
    assert triples.key(("北京。", "r", "x")) == triples.key(("北京", "r", "x"))  # CJK punctuation at the end


def test_triple_scores_by_hand():
    gold = [[("Ada", "works_at", "Acme"), ("Acme", "headquartered_in", "Berlin")],
            [("张伟", "works_at", "阿里巴巴")],
            [("李娜", "born_in", "北京")],
            []]
    predicted = [[("ada", "works at", "ACME"), ("Ada", "works_at", "Acme"), ("Acme", "headquartered_in", "Paris")],
                 [("张伟", "works_at", "阿里巴巴"), ("张伟", "born_in", "杭州")],
                 None,
                 []]
    totals, per = triples.score(predicted, gold)
    # Example 1: the duplicate counts once, the wrong tail is a miss: tp 1 of 2 predicted, 2 gold.
    assert (per[0]["triple_precision"], per[0]["triple_recall"], per[0]["triple_f1"]) == (0.5, 0.5, 0.5)
    # Example 2 (Chinese): tp 1, predicted 2, gold 1: P 1/2, R 1, F1 2/3.
    assert per[1]["triple_precision"] == 0.5 and per[1]["triple_recall"] == 1.0
    assert per[1]["triple_f1"] == pytest.approx(2 / 3)
    assert per[2] == {"triple_precision": 0.0, "triple_recall": 0.0, "triple_f1": 0.0, "parsed": 0.0}
    assert per[3]["triple_f1"] == 1.0  # nothing to find, nothing found
    # Micro over the task: tp 2, predicted 4, gold 4.
    assert totals == {"triple_precision": 0.5, "triple_recall": 0.5, "triple_f1": 0.5, "parsed": 0.75}


def test_task_file_extraction_type_and_its_mistakes(tmp_path):
    task = load_task(write_jsonl(tmp_path / "re.jsonl", [{"config": {"constrained": True}},
                                                         {"context": "Ada works at Acme.\nTriples:", "triples": [ADA]},
                                                         {"context": "无关系。\nTriples:", "triples": []}]))
    assert task.type == "extraction" and task.config.constrained
    bad = [({"context": "x", "triples": [{"head": "Ada", "relation": "works_at"}]}, "'triples' must be a list"),
           ({"context": "x", "triples": "Ada works_at Acme"}, "'triples' must be a list")]
    for row, message in bad:
        with pytest.raises(LmforgeError, match=message):
            load_task(write_jsonl(tmp_path / "bad.jsonl", [row]))
    with pytest.raises(LmforgeError, match="constrained does not apply to a generation task"):
        load_task(write_jsonl(tmp_path / "gen.jsonl", [{"config": {"constrained": True}}, {"context": "x", "answer": "y"}]))
    with pytest.raises(LmforgeError, match="unknown metric 'bleu' for a extraction task"):
        load_task(write_jsonl(tmp_path / "m.jsonl", [{"config": {"metric": "bleu"}}, {"context": "x", "triples": []}]))


def test_few_shot_extraction_prompt_shows_compact_json(tmp_path):
    from lmforge.eval.task_file import build_prompt

    task = load_task(write_jsonl(tmp_path / "re.jsonl", [{"context": "Ada works at Acme.\nTriples:", "triples": [ADA]},
                                                         {"context": "张伟在华为工作。\nTriples:", "triples": []}]))
    assert build_prompt(task, 1, num_fewshot=1).split("\n\n")[0] == \
        'Ada works at Acme.\nTriples: [{"head":"Ada","relation":"works_at","tail":"Acme"}]'


def test_free_extraction_scores_what_the_model_wrote(tiny_model_dir, tmp_path):
    rows = [{"id": "d1", "context": "Ada works at Acme.\nTriples:", "triples": [ADA]},
            {"id": "d2", "context": "张伟在华为工作。\nTriples:", "triples": [{"head": "张伟", "relation": "works_at", "tail": "华为"}]}]
    path = write_jsonl(tmp_path / "re.jsonl", [{"config": {"max_tokens": 12}}, *rows])
    report = run_tasks([tiny_model_dir], [path], examples_dir=tmp_path / "out")
    result = report["results"][str(tiny_model_dir)]["re"]
    out = [json.loads(line) for line in open(tmp_path / "out" / "re.jsonl", encoding="utf-8")]
    assert [r["id"] for r in out] == ["d1", "d2"]
    parsed = [triples.parse_triples(r["output"]) for r in out]
    expected, _ = triples.score(parsed, [[triples.as_triple(t) for t in r["triples"]] for r in rows])
    assert {k: result[k] for k in expected} == expected
    assert result["metric_names"] == ["triple_precision", "triple_recall", "triple_f1", "parsed"]


def test_constrained_outputs_always_parse(long_model_dir, tmp_path):
    lm = lmforge.load(long_model_dir)
    rows = [{"context": "Ada works at Acme.\nTriples:", "triples": [ADA]},
            {"context": "张伟在阿里巴巴工作，阿里巴巴总部位于杭州。\nTriples:", "triples": []},
            {"context": "Kafka was developed by LinkedIn.\nTriples:", "triples": []}]
    config = {"constrained": True, "n": 12, "temperature": 1.0, "seed": 5, "max_tokens": 900}
    task = load_task(write_jsonl(tmp_path / "c.jsonl", [{"config": config}, *rows]))
    result = evaluate_task(lm, task)
    outputs = [o for p in result.predictions for o in p["output"]]
    assert len(outputs) == 36
    assert result.metrics["parsed"] == 1.0 and result.metrics["truncated"] == 0.0
    for text in outputs:
        value = json.loads(text)  # the whole output is the JSON array, nothing around it
        assert isinstance(value, list) and len(value) <= triples.MAX_TRIPLES
        assert all(set(t) == set(triples.FIELDS) and all(1 <= len(t[f]) <= triples.MAX_CHARS for f in t) for t in value)
    assert any(json.loads(t) for t in outputs)  # random sampling wrote triples, not only []
    # Free sampling from the same random model is not JSON.
    free = load_task(write_jsonl(tmp_path / "f.jsonl", [{"config": {**config, "constrained": False, "max_tokens": 30}},
                                                        *rows]))
    assert evaluate_task(lm, free).metrics["parsed"] < 0.5


def test_csv_and_jsonld_round_trip(tmp_path):
    edges = [Edge("Ada Lovelace", "works_at", "Acme, Inc.", "doc-1"), Edge("张伟", "works_at", "阿里巴巴", "https://example.com/a?id=2"),
             Edge("阿里巴巴", "headquartered_in", "杭州", "https://example.com/a?id=2"),
             Edge('The "Q" team', "part_of", "Acme, Inc.", "doc-3")]
    assert from_csv(to_csv(edges)) == edges
    assert to_csv(edges).splitlines()[0] == "source,relation,target,doc_id"
    doc = to_jsonld(edges)
    assert from_jsonld(json.loads(json.dumps(doc))) == edges
    entities = [n for n in doc["@graph"] if "name" in n]
    assert len(entities) == 6  # "Acme, Inc." and "阿里巴巴" are one node each
    for name in ("g.csv", "g.jsonld"):
        write_graph(edges, tmp_path / name)
        assert read_graph(tmp_path / name) == read_graph(str(tmp_path / name)) == edges
    with pytest.raises(LmforgeError, match="name it .csv"):
        write_graph(edges, tmp_path / "g.txt")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LmforgeError, match="header"):
        read_graph(tmp_path / "bad.csv")


def test_extract_edges_from_documents(long_model_dir):
    lm = lmforge.load(long_model_dir)
    docs = [{"id": "d1", "text": "Ada works at Acme."}, {"id": "d2", "text": "张伟在阿里巴巴工作。"}]
    edges, rows = extract_edges(lm, docs, constrained=True, max_tokens=900)
    assert [r["id"] for r in rows] == ["d1", "d2"]
    assert all(triples.parse_triples(r["output"]) is not None for r in rows)
    assert all(e.doc_id in ("d1", "d2") for e in edges)
    assert len(edges) == len({(triples.key((e.source, e.relation, e.target)), e.doc_id) for e in edges})


def test_extract_command_writes_the_graph_and_refuses_bad_input(cli, tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "a1", "url": "https://example.com/1", "text": "Ada works at Acme."},
                                          {"id": "a2", "text": "张伟在华为工作。"}])
    done = cli("extract", tiny_model_dir, "--input", "docs.jsonl", "--out", "graph.csv", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "from 2 documents" in done.stdout
    assert (tmp_path / "graph.csv").read_text().splitlines()[0] == "source,relation,target,doc_id"
    bad = cli("extract", tiny_model_dir, "--input", "docs.jsonl", "--out", "graph.txt")
    assert bad.returncode == 2 and "name it .csv" in bad.stderr and "Traceback" not in bad.stderr
    write_jsonl(tmp_path / "nodocs.jsonl", [{"id": "x", "body": "no text field"}])
    bad = cli("extract", tiny_model_dir, "--input", "nodocs.jsonl", "--out", "g.jsonld")
    assert bad.returncode == 2 and "nodocs.jsonl:1" in bad.stderr and not (tmp_path / "g.jsonld").exists()
