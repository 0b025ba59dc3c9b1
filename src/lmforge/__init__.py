"""lmforge: one toolkit for the whole life of a large language model.

    import lmforge
    m = lmforge.load("runs/quickstart/model")
    m.generate(["To be"], max_new_tokens=32)
"""

from lmforge.errors import LmforgeError
from lmforge.loaded import LoadedModel, load

__all__ = ["LmforgeError", "LoadedModel", "load"]
