"""The cleaning recipe: one typed, validated YAML file.

`default.yaml` beside this module holds every default. A user's recipe names only what it
changes; it is merged over the defaults and validated here (`lmforge.config.load_config`,
as every YAML config), so a misspelt key or an unknown filter name is one clear `LmforgeError`
instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.config import Section, deep_merge, load_config, read_yaml_mapping

DEFAULT_RECIPE = Path(__file__).with_name("default.yaml")


class ReaderConfig(Section):
    text_field: str = "text"
    max_doc_chars: int = Field(1_000_000, gt=0)
    shard_bytes: int = Field(64 * 2**20, gt=0)


class NormalizeConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFKC"
    keep_cjk_punctuation: bool = True  # NFKC/NFKD leave ，：；！？（）～ and … as they are
    fix_mojibake: bool = True
    strip_control: bool = True
    whitespace: bool = True
    html_to_text: bool = False
    gutenberg: bool = True


class LangidConfig(Section):
    enabled: bool = True
    languages: list[str] | None = None
    min_score: float = Field(0.65, ge=0.0, le=1.0)
    max_chars: int = Field(1000, gt=0)  # classify the head of the document: stable answer, bounded cost

    @field_validator("languages", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(code, str) for code in value):
            from lmforge.data.clean.langid import normalize_code

            return list(dict.fromkeys(map(normalize_code, value)))  # zh-Hant, cmn, yue... are zh
        return value


class PiiConfig(Section):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True
    card: bool = True
    cn_id: bool = True


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    ngram: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    seed: int = 1


class DecontaminateConfig(Section):
    eval_files: list[str] = []
    eval_text_field: str = "text"
    ngram: int = Field(13, ge=1)


class OutputConfig(Section):
    samples_per_filter: int = Field(5, ge=0)
    keep_work: bool = False
    plots: bool = True


class CleanRecipe(Section):
    reader: ReaderConfig = ReaderConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    langid: LangidConfig = LangidConfig()
    # filter name -> its parameters; validated against the filter registry in `build_filters`
    filters: dict[str, dict[str, Any] | None] = {}
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    output: OutputConfig = OutputConfig()


def presets() -> list[str]:
    """Names of the recipes shipped beside this module (`--recipe books`)."""
    return sorted(p.stem for p in DEFAULT_RECIPE.parent.glob("*.yaml"))


def _over(below: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` merged over `below`, except that a `filters` section replaces the one below: the
    filters named are the filters that run, so a default filter can be left out."""
    filters = layer.get("filters")
    merged = deep_merge(below, {k: v for k, v in layer.items() if k != "filters"})
    if filters is not None:
        merged["filters"] = filters
    return merged


def load_recipe(path: str | Path | None = None, **overrides: Any) -> CleanRecipe:
    """Defaults, then the YAML file at `path` (or a preset name), then `overrides` (section -> keys)."""
    recipe = load_config(CleanRecipe, path, {k: v for k, v in overrides.items() if v is not None},
                         kind="cleaning recipe",
                         builtins={name: DEFAULT_RECIPE.with_name(f"{name}.yaml") for name in presets()},
                         defaults=read_yaml_mapping(DEFAULT_RECIPE, CleanRecipe), merge=_over)
    from lmforge.data.clean.filters import build_filters

    build_filters(recipe.filters)  # fails early, in the parent, on an unknown filter or parameter
    return recipe
