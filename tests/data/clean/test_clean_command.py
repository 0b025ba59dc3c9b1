"""`lmforge data clean` end to end through the real CLI entry point."""

import json
import subprocess
import sys

import pytest

from clean_samples import CHINESE, ENGLISH


def lmforge(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow  # a real `python -m lmforge` process: imports torch (~5-9 s here)
def test_clean_command_prints_a_summary_and_writes_the_corpus(tmp_path):
    raw = tmp_path / "raw.jsonl.gz"
    import gzip

    with gzip.open(raw, "wt") as f:
        for text in (ENGLISH, CHINESE, ENGLISH, "tiny"):
            f.write(json.dumps({"content": text}, ensure_ascii=False) + "\n")
    recipe = tmp_path / "clean.yaml"
    recipe.write_text("output: {plots: false}\n")
    result = lmforge("data", "clean", str(raw), "--out", "out", "--recipe", str(recipe), "--text-field", "content",
                     "--languages", "en", "--workers", "1", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 documents read, 1 kept" in result.stdout
    assert "exact_duplicate" in result.stdout and "other_language:zh" in result.stdout
    lines = (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["content"] for line in lines] == [ENGLISH]  # the record keeps its own text field
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["accounting_ok"] and stats["docs_read"] == 4


def run_main(monkeypatch, *args):
    from lmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_user_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("filters: {gopher_qualty: {}}\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert run_main(monkeypatch, "data", "clean", "a.jsonl", "--out", "out", "--recipe", "bad.yaml") == 2
    err = capsys.readouterr().err
    assert "unknown filter 'gopher_qualty'" in err and "Traceback" not in err
    assert run_main(monkeypatch, "data", "clean", "missing/*.jsonl", "--out", "out") == 2
    assert "matches no file" in capsys.readouterr().err
