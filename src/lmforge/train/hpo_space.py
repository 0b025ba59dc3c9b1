"""A hyperparameter search space: dotted recipe keys mapped to distributions.

    train.lr:        {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.n_layer:   {type: int, low: 1, high: 4}
    train.schedule:  {type: categorical, choices: [cosine, wsd]}

float takes `log` or `step`; int takes `log` or `step`; categorical takes `choices`
(scalars). Every key must name a leaf of the recipe (`lmforge.config.Recipe`), and each
bound or choice must be a value that key accepts. `run.*` and `eval.*` cannot be searched:
where trials are written belongs to the search, and what is measured must stay the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from lmforge.config import Recipe, deep_merge, describe_validation_error, load_config
from lmforge.errors import LmforgeError

TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}
FROZEN_SECTIONS = {"run": "trials are written under runs/<study>/trial-NNNN",
                   "eval": "every trial must be measured the same way"}


class SpaceFile(BaseModel):
    """A search space file as read: any dotted recipe keys, each with its distribution
    (`SearchSpace` checks them, with messages about distributions)."""

    model_config = ConfigDict(extra="allow")


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _field(key: str):
    """The pydantic field a dotted key names, or a LmforgeError saying why it names none."""
    model: type[BaseModel] = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the recipe"
            raise LmforgeError(f"search space key {key!r}: {where} has no key {part!r} "
                               f"(it has {', '.join(fields)})")
        info = fields[part]
        section = _section_type(info.annotation)
        if i == len(parts) - 1:
            if section is not None:
                raise LmforgeError(f"search space key {key!r} is a section; name one of its keys "
                                   f"({', '.join(key + '.' + k for k in section.model_fields)})")
            return info
        if section is None:
            raise LmforgeError(f"search space key {key!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        model = section
    raise AssertionError("unreachable")


def _section_type(annotation) -> type[BaseModel] | None:
    """The Section class behind `Section` or `Section | None`, else None."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _number(value: Any, kind: str) -> Any:
    """YAML reads `1e-4` (no dot) as a string; take it as the number it is meant to be."""
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class SearchSpace:
    """Validated distributions, in the order the space file lists them."""

    def __init__(self, raw: dict[str, Any], base: Recipe, where: str = "search space"):
        if not isinstance(raw, dict) or not raw:
            raise LmforgeError(f"{where} must be a non-empty YAML mapping of recipe keys to distributions, "
                               "e.g. `train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}`")
        self.raw = raw
        self.distributions = {}
        for key, spec in raw.items():
            self.distributions[key] = self._distribution(str(key), spec, where)
        self._check_values_fit(base, where)

    @classmethod
    def load(cls, path: str | Path, base: Recipe) -> "SearchSpace":
        read = load_config(SpaceFile, path, kind="search space", builtins={},
                           accepts="a YAML file of recipe keys and their distributions")
        return cls(read.model_extra, base, where=f"search space {path}")

    @staticmethod
    def _distribution(key: str, spec: Any, where: str):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        section = key.split(".")[0]
        if section in FROZEN_SECTIONS:
            raise LmforgeError(f"{where}: {key} cannot be searched: {FROZEN_SECTIONS[section]}")
        _field(key)
        bad = f"{where}: {key}"
        if not isinstance(spec, dict) or "type" not in spec:
            raise LmforgeError(f"{bad} needs a mapping with a type ({', '.join(TYPES)}), e.g. "
                               "{type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
        kind = spec["type"]
        if kind not in TYPES:
            raise LmforgeError(f"{bad}: unknown type {kind!r}; use one of {', '.join(TYPES)}")
        unknown = set(spec) - TYPES[kind] - {"type"}
        if unknown:
            raise LmforgeError(f"{bad}: a {kind} distribution has no {', '.join(sorted(unknown))} "
                               f"(it takes {', '.join(sorted(TYPES[kind]))})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise LmforgeError(f"{bad}: choices must be a non-empty list")
            if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
                raise LmforgeError(f"{bad}: choices must be plain values (numbers, strings, booleans, null)")
            if len({repr(c) for c in choices}) != len(choices):
                raise LmforgeError(f"{bad}: choices repeat a value")
            return CategoricalDistribution(choices)
        number = int if kind == "int" else (int, float)
        low, high, step = (_number(spec.get(k), kind) for k in ("low", "high", "step"))
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, number):
                raise LmforgeError(f"{bad}: {name} must be {'an integer' if kind == 'int' else 'a number'}, "
                                   f"got {value!r}")
        if not low < high:
            raise LmforgeError(f"{bad}: low ({low}) must be below high ({high})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise LmforgeError(f"{bad}: log must be true or false")
        if log and low <= 0:
            raise LmforgeError(f"{bad}: a log scale needs low > 0 (got {low})")
        if step is not None:
            if log:
                raise LmforgeError(f"{bad}: step and log cannot be combined")
            if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
                raise LmforgeError(f"{bad}: step must be a positive {'integer' if kind == 'int' else 'number'}")
            if step > high - low:
                raise LmforgeError(f"{bad}: step ({step}) is larger than the range {low}..{high}")
        if kind == "int":
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(float(low), float(high), log=log, step=step)

    def _candidates(self, key: str) -> list[Any]:
        d = self.distributions[key]
        return list(d.choices) if hasattr(d, "choices") else [d.low, d.high]

    def _check_values_fit(self, base: Recipe, where: str) -> None:
        """Each bound and choice must be a value its key accepts. Checked on the key's own
        type, then inside the base recipe; the second check is skipped for sections where
        other keys are searched too, since a value may only be valid in combination
        (d_model with n_head): such a trial fails with its reason instead."""
        base_dump = base.model_dump(mode="json")
        sections = [k.rsplit(".", 1)[0] for k in self.distributions]
        for key in self.distributions:
            adapter = TypeAdapter(_field(key).annotation)
            alone = sections.count(key.rsplit(".", 1)[0]) == 1
            for value in self._candidates(key):
                try:
                    adapter.validate_python(value)
                    if alone:
                        Recipe.model_validate(deep_merge(base_dump, nested({key: value})))
                except ValidationError as e:
                    reason = describe_validation_error(e, "value").removeprefix("invalid value: ")
                    raise LmforgeError(f"{where}: {key} = {value!r} is not a valid value ({reason})") from None

    def suggest(self, trial) -> dict[str, Any]:
        """Draw one value per key from an Optuna trial: {dotted key: value}."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        values = {}
        for key, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                values[key] = trial.suggest_categorical(key, d.choices)
            elif isinstance(d, IntDistribution):
                values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
            else:
                values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        return values
