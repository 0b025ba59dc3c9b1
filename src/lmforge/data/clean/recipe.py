"""The cleaning recipe: one typed, validated YAML file.

`default.yaml` beside this module holds every default. A user's recipe names only what it
changes; it is merged over the defaults and validated here, so a misspelt key or an unknown
filter name is one clear `LmforgeError` instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.config import deep_merge
from lmforge.errors import LmforgeError

DEFAULT_RECIPE = Path(__file__).with_name("default.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReaderConfig(_Strict):
    text_field: str = "text"
    max_doc_chars: int = Field(1_000_000, gt=0)
    shard_bytes: int = Field(64 * 2**20, gt=0)


class NormalizeConfig(_Strict):
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFKC"
    keep_cjk_punctuation: bool = True  # NFKC/NFKD leave ，：；！？（）～ and … as they are
    fix_mojibake: bool = True
    strip_control: bool = True
    whitespace: bool = True
    html_to_text: bool = False
    gutenberg: bool = True


class LangidConfig(_Strict):
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


class PiiConfig(_Strict):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True
    card: bool = True
    cn_id: bool = True


class DedupConfig(_Strict):
    exact: bool = True
    near: bool = True
    ngram: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    seed: int = 1


class DecontaminateConfig(_Strict):
    eval_files: list[str] = []
    eval_text_field: str = "text"
    ngram: int = Field(13, ge=1)


class OutputConfig(_Strict):
    samples_per_filter: int = Field(5, ge=0)
    keep_work: bool = False
    plots: bool = True


class CleanRecipe(_Strict):
    reader: ReaderConfig = ReaderConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    langid: LangidConfig = LangidConfig()
    # filter name -> its parameters; validated against the filter registry in `build_filters`
    filters: dict[str, dict[str, Any] | None] = {}
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    output: OutputConfig = OutputConfig()


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"recipe {source}: {what} at '{where}'; fix it or remove it (defaults: {DEFAULT_RECIPE.name})"


def presets() -> list[str]:
    """Names of the recipes shipped beside this module (`--recipe books`)."""
    return sorted(p.stem for p in DEFAULT_RECIPE.parent.glob("*.yaml"))


def load_recipe(path: str | Path | None = None, **overrides: Any) -> CleanRecipe:
    """Defaults, then the YAML file at `path` (or a preset name), then `overrides` (section -> keys)."""
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    source = "default"
    if path is not None and str(path) in presets() and not Path(path).exists():
        path = DEFAULT_RECIPE.with_name(f"{path}.yaml")
    if path is not None:
        source = str(path)
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise LmforgeError(f"recipe {path} does not exist; pass a YAML file or a preset ({', '.join(presets())})") from None
        except yaml.YAMLError as exc:
            raise LmforgeError(f"recipe {path} is not valid YAML ({exc.__class__.__name__}); fix its syntax") from None
        if not isinstance(user, dict):
            raise LmforgeError(f"recipe {path} must be a mapping of sections (reader, filters, …)")
        # A user's `filters:` section replaces the default list, so a filter can be left out.
        user_filters = user.pop("filters", None)
        data = deep_merge(data, user)
        if user_filters is not None:
            data["filters"] = user_filters
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "filters" in overrides:  # as in a recipe file: the filters named are the filters that run
        data["filters"] = overrides.pop("filters")
    data = deep_merge(data, overrides)
    try:
        recipe = CleanRecipe.model_validate(data)
    except ValidationError as exc:
        raise LmforgeError(_one_line(exc, source)) from None
    from lmforge.data.clean.filters import build_filters

    build_filters(recipe.filters)  # fails early, in the parent, on an unknown filter or parameter
    return recipe
