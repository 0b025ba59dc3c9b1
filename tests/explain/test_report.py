"""`lmforge explain` writes a self-contained HTML report that renders, images and all, in headless Chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Counts the page's images once it has loaded, and how many decoded (naturalWidth > 0).
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
         " document.body.setAttribute('data-images', im.length + '/' + im.filter(i => i.complete && i.naturalWidth > 0).length);"
         " });</script>")


@pytest.mark.slow
def test_explain_cli_writes_a_self_contained_report(cli, tiny_model_dir, tmp_path):
    proc = cli("explain", tiny_model_dir, "--prompt", "The cat sat on the <mat> &", "--out", "out/report.html")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert "attribution bar chart" in images
    assert sum(a.startswith("attention heatmaps, layer") for a in images) == 2  # one per layer
    assert "&lt;mat&gt;" in page and "<mat>" not in page  # prompt text is escaped
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    assert "Logit lens" in page and "integrated gradients" in page
    too_long = cli("explain", tiny_model_dir, "--prompt", "word " * 300, "--out", "long.html")
    assert too_long.returncode == 2 and "more than the model's context of 64" in too_long.stderr
    assert not (tmp_path / "long.html").exists()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/install-chromium.sh)")
def test_report_renders_with_its_images_in_headless_chromium(tiny_model_dir, tmp_path):
    import lmforge
    from lmforge.explain.report import explain

    report = explain(lmforge.load(tiny_model_dir), "Once upon a time", tmp_path / "report.html")
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    total, decoded = map(int, loaded.groups())
    assert total == 3 and decoded == total  # bar chart + 2 attention layers, every one decoded
    shot = tmp_path / "shot.png"
    subprocess.run([*args, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_chinese_prompt_gets_readable_tokens_and_real_glyphs(tiny_model_dir, tmp_path):
    """The session's tokenizer knows no Chinese: each character is three byte tokens, named by their bytes."""
    import warnings

    import matplotlib

    import lmforge
    from lmforge.explain.report import explain

    matplotlib.rcdefaults()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CJK character drawn as a box warns "Glyph ... missing from font(s)"
        page = explain(lmforge.load(tiny_model_dir), "模型的注意力 (attention) 机制", tmp_path / "zh.html").read_text()
    assert "\ufffd" not in page
    tokens = re.findall(r'<span class="tok" style="background:#eee">(.*?)</span>', page)
    assert "".join(tokens).startswith("\\xe6\\xa8\\xa1\\xe5\\x9e\\x8b")  # 模 = e6 a8 a1, 型 = e5 9e 8b
    assert "(attention)" in "".join(tokens)
    assert "<code>&lt;|endoftext|&gt;</code> at every position" in page  # the baseline is named
    total, diff = map(float, re.search(r"sum to (-?[\d.]+) against a score difference of\s+(-?[\d.]+)", page).groups())
    assert total == pytest.approx(diff, rel=1e-3, abs=2e-4)  # the page prints 4 decimals
