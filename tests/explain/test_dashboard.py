"""`lmforge plot` draws overlaid training curves; training runs record FLOPs, MFU and energy."""

from __future__ import annotations

import json
import shutil

import pytest

from lmforge.eval.compute import run_summary


def hand_count_flops_per_token(cfg) -> int:
    """Training FLOPs per token of an lmforge llama-family model, counted from its shapes by hand."""
    d, hd, h, kv, ff, T = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_dim, cfg.context
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + d * 2 * ff + ff * d  # qkv, out proj, SwiGLU up+gate, down
    weights = cfg.n_layer * per_layer + d * cfg.vocab  # + lm_head
    forward = 2 * weights + cfg.n_layer * 2 * 2 * T * h * hd  # QK^T and AV over T keys
    return 3 * forward


def test_training_run_summary_counts_flops_by_hand(trained_run):
    summary = json.loads((trained_run.run_dir / "summary.json").read_text())
    from lmforge.config import load_recipe

    model_cfg = load_recipe(str(trained_run.run_dir / "recipe.yaml"), []).model
    tokens = trained_run.steps * 8 * model_cfg.context  # batch 8, one micro-batch per step
    assert summary["tokens"] == tokens and summary["steps"] == trained_run.steps
    assert summary["flops_per_token"] == hand_count_flops_per_token(model_cfg)
    assert summary["total_flops"] == hand_count_flops_per_token(model_cfg) * tokens
    assert summary["wall_s"] == pytest.approx(trained_run.seconds, abs=5e-4)  # written to the millisecond
    assert summary["achieved_flops_per_s"] == pytest.approx(summary["total_flops"] / trained_run.seconds, rel=1e-3)
    assert 0 < summary["mfu"] < 1
    assert summary["energy_kwh"] > 0 and summary["co2_kg"] == pytest.approx(
        summary["energy_kwh"] * summary["grid_g_per_kwh"] / 1000)


def test_energy_estimate_and_grid_intensity(monkeypatch):
    monkeypatch.setenv("LMFORGE_GRID_INTENSITY", "100")
    s = run_summary(1e9, 1000, 10, 3600.0, "cpu")
    watts = float(s["energy_source"].split("(")[1].split(" W")[0])
    assert s["energy_kwh"] == pytest.approx(watts / 1000)  # one hour at the default power
    assert s["co2_kg"] == pytest.approx(watts / 1000 * 100 / 1000)
    measured = run_summary(1e9, 1000, 10, 100.0, "cpu", measured_j=3.6e6, measured_s=100.0, source="measured (RAPL)")
    assert measured["energy_kwh"] == pytest.approx(1.0) and measured["energy_source"] == "measured (RAPL)"


@pytest.mark.slow
def test_plot_overlays_runs(cli, trained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_run.run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "model", "latest"))
    proc = cli("plot", trained_run.run_dir, other, "--out", "plots")
    assert proc.returncode == 0, proc.stderr
    for name in ("dashboard", "loss", "lr", "grad_norm", "throughput"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert "FLOPs" in proc.stdout and "MFU" in proc.stdout
    missing = cli("plot", tmp_path / "nope")
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def test_plot_draws_a_chinese_run_name_with_real_glyphs(tmp_path):
    import warnings

    import matplotlib

    from lmforge.explain.dashboard import plot_runs

    run = tmp_path / "中文预训练"
    run.mkdir()
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s, "tokens_per_s": 1000.0}
               for s in range(1, 11)] + [{"step": 10, "val_loss": 0.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    matplotlib.rcdefaults()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CJK character drawn as a box warns "Glyph ... missing from font(s)"
        paths = plot_runs([run], tmp_path / "plots")
    assert [p.name for p in paths] == ["dashboard.png", "loss.png", "lr.png", "grad_norm.png", "throughput.png"]
