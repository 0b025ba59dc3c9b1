"""lmforge: one toolkit for the whole life of a large language model.

    import lmforge
    m = lmforge.load("runs/quickstart/model")
    m.generate(["To be"], max_new_tokens=32)

`load` and `LoadedModel` are imported on first use, so that light modules (the CLI's
help, data-cleaning worker processes) do not pay for importing torch.
"""

from lmforge.errors import LmforgeError

__all__ = ["LmforgeError", "LoadedModel", "load"]


def __getattr__(name: str):
    if name in ("load", "LoadedModel"):
        from lmforge import loaded

        return getattr(loaded, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
