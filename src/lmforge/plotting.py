"""Matplotlib for lmforge's figures: headless, with a CJK font behind the default one; figures
as `data:` URIs and the style of the self-contained HTML pages that hold them (explain, eval).

Matplotlib's own font (DejaVu Sans) has no Chinese, Japanese or Korean characters, and draws
a box for each. `pyplot()` registers Noto Sans CJK (shipped by the `notojp-matplotlib`
package, a dependency: the full pan-CJK font, simplified and traditional Chinese included,
with Japanese default glyph shapes) and lists it after the configured font family, so Latin
text keeps its look and any character that family lacks falls back to Noto. Importing `notojp_matplotlib` itself
would make Noto the only font; only its file is used here.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

# The reports' page style (lmforge explain, lmforge eval --report).
PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
code, .tok, .mono { font-family: ui-monospace, monospace; white-space: pre; }
.tok { display: inline-block; padding: 2px 3px; margin: 1px; border-radius: 3px; white-space: pre; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #f3f3f3; } img { max-width: 100%; } .muted { color: #777; }
"""
CJK_FAMILY = "Noto Sans CJK JP"
_CJK_FILE = ("fonts", "NotoSansCJKjp-Regular.otf")


def cjk_font_file() -> Path | None:
    """The CJK font's file, or None when the package is missing (a broken install)."""
    spec = find_spec("notojp_matplotlib")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_CJK_FILE)
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _add_cjk_font() -> bool:
    from matplotlib import font_manager

    path = cjk_font_file()
    if path is None:
        return False
    font_manager.fontManager.addfont(str(path))
    return True


def pyplot():
    """`matplotlib.pyplot` on the headless Agg backend, CJK text drawable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Matplotlib falls back from one entry of `font.family` to the next (a generic entry such
    # as "sans-serif" counts as the one font it resolves to): the CJK font goes last. Checked
    # on every call, as settings may have been reset since the last.
    families = list(matplotlib.rcParams["font.family"])
    if _add_cjk_font() and CJK_FAMILY not in families:
        matplotlib.rcParams["font.family"] = [*families, CJK_FAMILY]
    return plt


def png_data_uri(fig, dpi: int = 90) -> str:
    """The figure as a base64 PNG `data:` URI (a page that embeds it needs no other file); closes it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
