"""The data refinery behind `lmforge data clean`: read, normalize, filter, scrub, deduplicate, report.

    from lmforge.data.clean import clean, load_recipe
    stats = clean(["raw/*.jsonl.gz"], "clean/", load_recipe("clean.yaml"), workers=2)

Modules, in the order a document meets them: `readers` (files → shards → documents),
`normalize`, `langid`, `filters/` (gopher, c4, fineweb), `pii`, `decontaminate`,
`minhash` + `dedup` (global), then `report`. `pipeline` runs them over a worker pool and
makes the run resumable; `recipe` is the typed configuration; `command` is the CLI verb.
"""

from lmforge.data.clean.pipeline import clean
from lmforge.data.clean.recipe import CleanRecipe, load_recipe

__all__ = ["CleanRecipe", "clean", "load_recipe"]
