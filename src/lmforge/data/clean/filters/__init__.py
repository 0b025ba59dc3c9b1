"""Quality filters: each one named, individually switchable, with per-language overrides.

A filter's `apply(doc)` returns None to keep the document or a short reason
(`"min_doc_words"`) to drop it; some filters (boilerplate, C4) also edit the text, dropping
lines, and list what they dropped in `doc.removed_lines` for the report.
Parameters are a pydantic model per filter, so an unknown parameter is an error; the
`by_language` mapping overrides parameters for documents identified as that language.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.data.clean.document import Document
from lmforge.errors import LmforgeError


class FilterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    by_language: dict[str, dict[str, Any]] = {}


class Filter:
    name: ClassVar[str]
    Params: ClassVar[type[FilterParams]]

    def __init__(self, params: FilterParams):
        self.params = params
        # A recipe's by_language entries are merged over the filter's own (e.g. CJK) defaults.
        defaults = self.Params.model_fields["by_language"].default
        overrides = {lang: {**defaults.get(lang, {}), **params.by_language.get(lang, {})}
                     for lang in {*defaults, *params.by_language}}
        base = params.model_dump(exclude={"by_language"})
        self._per_language = {lang: self.Params.model_validate({**base, **over}) for lang, over in overrides.items()}

    def params_for(self, doc: Document) -> Any:
        return self._per_language.get(doc.language, self.params)

    def apply(self, doc: Document) -> str | None:
        raise NotImplementedError


def _registry() -> dict[str, type[Filter]]:
    from lmforge.data.clean.filters.boilerplate import BoilerplateFilter
    from lmforge.data.clean.filters.c4 import C4Filter
    from lmforge.data.clean.filters.fineweb import FineWebFilter
    from lmforge.data.clean.filters.gopher import GopherQualityFilter, GopherRepetitionFilter

    filters = (BoilerplateFilter, GopherRepetitionFilter, GopherQualityFilter, C4Filter, FineWebFilter)
    return {f.name: f for f in filters}


def build_filters(config: dict[str, dict[str, Any] | None]) -> list[Filter]:
    """Instantiate the enabled filters in recipe order; one clear error for a bad name or key."""
    registry = _registry()
    filters = []
    for name, raw in config.items():
        if name not in registry:
            raise LmforgeError(f"recipe: unknown filter '{name}'; known filters: {', '.join(registry)}")
        cls = registry[name]
        try:
            params = cls.Params.model_validate(raw or {})
            instance = cls(params)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise LmforgeError(f"recipe: filter '{name}' parameter '{where}': {first['msg']}") from None
        if params.enabled:
            filters.append(instance)
    return filters
