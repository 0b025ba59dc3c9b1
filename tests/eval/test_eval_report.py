"""The HTML report of an eval run and the comparison of saved runs."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.report import (compare, compare_html, compare_table, load_results, read_examples, run_html,
                                  worst_examples)

MODEL = "runs/qa-model"


def gen_rows(n: int = 8) -> list[dict]:
    """Per-example rows as a generation task writes them; example i scores i / n, the worst one
    wrote a script tag."""
    rows = []
    for i in range(n):
        output = "<script>alert('pwned')</script>" if i == 0 else f"答案 {i}"
        rows.append({"model": MODEL, "task": "qa", "index": i, "id": f"q{i}", "prompt": f"问：第{i}题？答：",
                     "output": output, "reference": f"答案 {i}", "exact_match": i / n, "f1": i / n})
    return rows


def sample_report() -> dict:
    results = {MODEL: {
        "qa": {"task": "qa", "type": "generation", "examples": 8, "num_fewshot": 0, "exact_match": 0.4375,
               "f1": 0.5, "metric_names": ["exact_match", "f1"], "seconds": 1.0, "examples_per_s": 8.0},
        "qa+typos": {"task": "qa+typos", "type": "generation", "examples": 8, "num_fewshot": 0, "exact_match": 0.25,
                     "f1": 0.375, "metric_names": ["exact_match", "f1"], "seconds": 1.0, "examples_per_s": 8.0,
                     "perturbation": "typos", "clean_task": "qa", "exact_match_drop": 0.1875, "f1_drop": 0.125},
        "bias": {"task": "bias", "type": "minimal_pairs", "examples": 4, "num_fewshot": 0, "pct_stereotype": 0.75,
                 "ll_diff": 0.3, "pct_stereotype:age": 1.0, "pct_stereotype:region": 0.5,
                 "pct_stereotype_ci_low": 0.25, "pct_stereotype_ci_high": 1.0,
                 "pct_stereotype_ci_low:age": 1.0, "pct_stereotype_ci_high:age": 1.0,
                 "pct_stereotype_ci_low:region": 0.0, "pct_stereotype_ci_high:region": 1.0,
                 "metric_names": ["pct_stereotype", "ll_diff", "pct_stereotype:age", "pct_stereotype:region"],
                 "seconds": 0.1, "examples_per_s": 40.0},
    }}
    return {"models": [MODEL], "num_fewshot": 0, "seed": 1234, "results": results,
            "config": {"tasks": ["qa.jsonl", "bias.jsonl"], "seed": 1234, "perturb": {"qa": ["typos"]}},
            "machine": {"host": "box-<b>1</b>", "torch": "2.x"}}


def bias_rows() -> list[dict]:
    return [{"model": MODEL, "task": "bias", "index": i, "id": f"b{i}", "category": c, "stereotyped": f"S{i}",
             "anti_stereotyped": f"A{i}", "ll_diff": d, "prefers_stereotype": float(d > 0)}
            for i, (c, d) in enumerate([("age", 2.0), ("age", 0.5), ("region", -1.0), ("region", 4.0)])]


def test_report_has_tables_figures_worst_examples_and_escapes_output():
    page = run_html(sample_report(), {"qa": gen_rows(), "bias": bias_rows()})
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page
    assert "box-&lt;b&gt;1&lt;/b&gt;" in page  # the machine table is escaped too
    # summary: every task and metric with its value, the perturbed run with its drop
    for task, metric, value in [("qa", "exact_match", "0.4375"), ("qa+typos", "f1", "0.3750"),
                                ("bias", "pct_stereotype:region", "0.5000")]:
        assert re.search(rf"<td>{re.escape(task)}</td><td>{re.escape(metric)}</td><td class=\"num\">{value}", page)
    assert "drop +0.1875" in page
    # one PNG per top-level task (qa with its perturbation beside it, the bias probe), all inline
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)
    assert images == ["qa", "bias"]
    assert "src=\"http" not in page and "<link" not in page
    # worst examples: the 5 lowest exact-match rows of qa in order, none of the better ones
    qa = page[page.index("<h3>qa</h3>", page.index("Worst examples")):]
    shown = re.findall(r"<td>(q\d)</td>", qa.split("</table>")[0])
    assert shown == ["q0", "q1", "q2", "q3", "q4"]
    bias = page[page.index("<h3>bias</h3>", page.index("Worst examples")):].split("</table>")[0]
    assert re.findall(r"<td>(b\d)</td>", bias) == ["b3", "b0", "b1", "b2"]  # strongest stereotype first
    assert "qa.jsonl" in page and "1234" in page


def test_example_rows_found_beside_a_moved_results_file(tmp_path, monkeypatch):
    report = {**sample_report(), "examples": {"qa": "elsewhere/r.examples/qa.jsonl"}}
    (tmp_path / "r.examples").mkdir()
    (tmp_path / "r.examples" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows(3)))
    monkeypatch.chdir(tmp_path)
    assert read_examples(report) == {}
    assert [r["id"] for r in read_examples(report, tmp_path / "r.json")["qa"]] == ["q0", "q1", "q2"]


def test_worst_examples_of_multiple_choice_and_perplexity():
    mc = [{"index": i, "prompt": f"Q{i}", "choices": ["a", "b"], "gold": 0, "pred": p, "loglikelihoods": ll,
           "acc": float(p == 0)} for i, (p, ll) in enumerate([(0, [-1, -3]), (1, [-2, -1.5]), (1, [-5, -1]),
                                                             (0, [-1, -1.2])])]
    worst = worst_examples("multiple_choice", mc, ["acc", "acc_norm"], n=3)
    assert [v["id"] for v in worst] == [2, 1, 3]  # wrong picks first, the widest miss first; then the narrowest win
    assert worst[0]["output"] == "b" and worst[0]["reference"] == "a"
    ppl = [{"index": i, "text": f"t{i}", "loss": loss} for i, loss in enumerate([2.0, 5.0, 1.0])]
    assert [v["id"] for v in worst_examples("perplexity", ppl, ["perplexity"])] == [1, 0, 2]


def other_report() -> dict:
    """A second model: qa better, no bias task, an extra task."""
    rep = sample_report()
    r = rep["results"].pop(MODEL)
    r["qa"] = {**r["qa"], "exact_match": 0.5, "f1": 0.625}
    del r["bias"]
    r["capitals"] = {"task": "capitals", "type": "multiple_choice", "examples": 3, "num_fewshot": 0, "acc": 2 / 3,
                     "acc_norm": 1.0, "seconds": 1.0, "examples_per_s": 3.0}
    rep["models"] = ["runs/other"]
    rep["results"]["runs/other"] = r
    return rep


def test_compare_values_are_deltas_of_inputs():
    a, b = sample_report(), other_report()
    comparison = compare([("a.json", a), ("b.json", b)])
    assert [c["label"] for c in comparison["columns"]] == [MODEL, "runs/other"]
    rows = {(r["task"], r["metric"]): r for r in comparison["rows"]}
    for metric in ("exact_match", "f1"):
        va, vb = a["results"][MODEL]["qa"][metric], b["results"]["runs/other"]["qa"][metric]
        assert rows[("qa", metric)]["values"] == [va, vb]
        assert rows[("qa", metric)]["deltas"] == [0.0, pytest.approx(vb - va)]
    assert rows[("bias", "pct_stereotype")]["values"] == [0.75, None]  # b has no bias task: blank
    assert rows[("bias", "pct_stereotype")]["deltas"] == [0.0, None]
    assert rows[("capitals", "acc")]["values"] == [None, 2 / 3] and rows[("capitals", "acc")]["deltas"] == [None, None]
    assert rows[("qa+typos", "f1")]["drops"] == [0.125, 0.125]
    page = compare_html(comparison)
    assert "(+0.0625)" in page and "(+0.1250)" in page  # exact_match 0.4375 -> 0.5, f1 0.5 -> 0.625
    assert "a.json: run" in page and "b.json: machine" in page
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(compare_table(comparison))
    text = console.export_text()
    assert "0.5000 (+0.0625)" in text and "0.6250 (+0.1250)" in text


def test_same_model_in_two_files_gets_the_file_in_its_label(tmp_path):
    comparison = compare([("before.json", sample_report()), ("after.json", sample_report())])
    assert [c["label"] for c in comparison["columns"]] == [f"before.json: {MODEL}", f"after.json: {MODEL}"]
    bad = tmp_path / "bad.json"
    bad.write_text("{\"not\": \"results\"}")
    with pytest.raises(LmforgeError, match="bad.json: no 'models' and 'results' in it"):
        load_results(bad)
    with pytest.raises(LmforgeError, match="missing.json: not a readable results JSON"):
        load_results(tmp_path / "missing.json")


@pytest.mark.slow
def test_cli_report_and_compare(tiny_model_dir, cli, tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"context": "France: capital", "choices": ["Paris", "<script>x</script>"], "gold": 1},
        {"context": "法国的首都是", "choices": ["巴黎", "罗马"], "gold": 0},
    ]), encoding="utf-8")
    run = cli("eval", tiny_model_dir, "--tasks", "mc.jsonl", "--perturb", "fullwidth", "--out", "r.json")
    assert run.returncode == 0, run.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "mc+fullwidth" in page and "data:image/png;base64," in page and "<script>x" not in page
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["machine"]["torch"] and saved["config"]["perturb"] == {"mc": ["fullwidth"]}
    other = json.loads((tmp_path / "r.json").read_text())
    other["results"][str(tiny_model_dir)]["mc"]["acc"] -= 0.5
    (tmp_path / "r2.json").write_text(json.dumps(other))
    out = cli("eval", "--compare", "r.json", "--compare", "r2.json", "--json", "--report", "c.html")
    assert out.returncode == 0, out.stderr
    rows = {(r["task"], r["metric"]): r for r in json.loads(out.stdout)["rows"]}
    assert rows[("mc", "acc")]["deltas"][1] == pytest.approx(-0.5)
    assert "(-0.5000)" in (tmp_path / "c.html").read_text(encoding="utf-8")
    again = cli("eval", "--compare", "r.json", "--report", "again.html")  # one saved run: its report, rebuilt
    assert again.returncode == 0, again.stderr
    page = (tmp_path / "again.html").read_text(encoding="utf-8")
    assert "Worst examples" in page and "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    missing = cli("eval", "--compare", "r.json", "--compare", "nope.json")
    assert missing.returncode == 2 and "nope.json: not a readable results JSON" in missing.stderr
    assert "Traceback" not in missing.stderr
