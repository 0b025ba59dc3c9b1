"""Figures draw Chinese, Japanese and Korean text with a real font, not boxes."""

from __future__ import annotations

import warnings

import matplotlib
import pytest

from lmforge.plotting import CJK_FAMILY, cjk_font_file, pyplot

CJK_TEXT = "训练损失（validation loss）中文標題 日本語 한국어"


def draw(text: str, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.set_title(text)
    ax.set_xticks([0, 1], ["注意力", "tokens"])
    fig.savefig(path)
    plt.close(fig)


def test_the_cjk_font_ships_with_the_install():
    path = cjk_font_file()
    assert path is not None and path.stat().st_size > 10_000_000  # the full pan-CJK font, not a subset
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(path), lazy=True).getBestCmap()
    assert all(ord(c) in cmap for c in "训练损失中文標題日本語한국어这们")


def test_chinese_text_draws_without_a_missing_glyph_warning(tmp_path):
    matplotlib.rcdefaults()  # as a fresh process starts: DejaVu Sans alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for each box
        draw(CJK_TEXT, tmp_path / "cjk.png")
    assert matplotlib.rcParams["font.family"][-1] == CJK_FAMILY
    assert matplotlib.rcParams["font.family"][0] == "sans-serif"  # Latin text keeps its font


def test_without_the_fallback_matplotlib_draws_boxes(tmp_path):
    """What the test above guards against (so it cannot pass vacuously)."""
    matplotlib.rcdefaults()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(CJK_TEXT)
    with pytest.warns(UserWarning, match="missing from font"):
        fig.savefig(tmp_path / "boxes.png")
    plt.close(fig)
