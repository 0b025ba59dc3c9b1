"""`lmforge compare`: one row per model with size, perplexity and speed, and a chart."""

from __future__ import annotations

import json

from lmforge.compress.compare import compare
from lmforge.compress.quantize import run_quantize


def test_compare_rows_and_chart(tiny_model_dir, tiny_data, tmp_path):
    q8 = tmp_path / "q8"
    # lmforge's layout: this tiny model is mostly its tied embedding, which the compressed-tensors
    # layout also stores in fp32 (tests/compress/test_ecosystem_formats.py), hiding the halved codes.
    run_quantize(tiny_model_dir, "int8", q8, log=lambda s: None, layout="lmforge")
    rows = compare([tiny_model_dir, q8], tiny_data, max_batches=2, new_tokens=8, chart=tmp_path / "c.png")
    fp32, int8 = rows
    assert (fp32.method, int8.method) == ("fp32", "int8")
    assert fp32.parameters == int8.parameters
    assert int8.file_mb < fp32.file_mb / 2
    assert int8.weight_mb_per_token < fp32.weight_mb_per_token / 3
    assert abs(int8.perplexity - fp32.perplexity) / fp32.perplexity < 0.05
    assert fp32.tokens_per_s > 0 and int8.tokens_per_s > 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_compare(cli, tiny_model_dir, tiny_data, tmp_path):
    r = cli("compare", tiny_model_dir, "--data", tiny_data, "--max-batches", "1", "--new-tokens", "4",
            "--chart", tmp_path / "c.png", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["method"] == "fp32" and row["perplexity"] > 1
    r = cli("compare", tmp_path / "nowhere")
    assert r.returncode == 2 and "not found" in r.stderr


def test_quickstart_step_quantizes_and_prints_the_report(tiny_model_dir, tiny_data, tmp_path):
    from rich.console import Console

    from lmforge.compress.command import quickstart_report

    out = Console(record=True, width=200)
    quickstart_report(tiny_model_dir, tiny_data, tmp_path, out)
    text = out.export_text()
    assert "compression report" in text and "int8" in text and "int4 g32" in text
    assert (tmp_path / "model-int8" / "config.json").is_file() and (tmp_path / "model-int4").is_dir()
    assert (tmp_path / "plots" / "compare.png").is_file()
