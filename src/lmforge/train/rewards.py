"""Reward functions for reinforcement learning with verifiable rewards (`train.grpo`).

A reward is a Python function `reward(prompt, completion, **fields) -> float`: `prompt` is the
prompt as the data gives it (the text, or the chat as a list of messages), `completion` the
sampled text, and `fields` every other key of the prompt's JSONL line (`answer`, `tests`...).
A recipe names its rewards, each with a weight; the reward of a completion is the weighted sum:

    grpo:
      rewards:
        - exact_answer                                   # a built-in, weight 1
        - {function: regex, weight: 0.2, options: {pattern: "答案|answer"}}
        - {function: my_rewards.py:brevity, weight: 0.5} # a function in a file (or module:function)

`options` are keyword arguments given to the function on every call (a built-in reads its
settings there). Built-ins:

- `exact_answer`: 1 when the last number in the completion equals the line's `answer` (a
  number, or text holding one), else 0. Full-width digits count; thousands separators
  (1,234) and fractions (3/4) are read as numbers.
- `regex`: 1 when `options.pattern` is found in the completion (`full: true`: when it matches
  the whole completion, surrounding whitespace aside), else 0.
- `json_schema`: 1 when the completion (a ```json fence around it allowed) is JSON that
  validates against `options.schema`, or the schema in the line's `schema` field, else 0.
- `code_tests`: 1 when the completion's code (the first ```python fence, or the whole text)
  followed by the line's `tests` (asserts) runs to completion in `lmforge.eval.sandbox`,
  else 0. Options: `timeout` (seconds, default 5), `memory_mb` (default 512).
- `tool_used` (multi-turn environments, `grpo.environment`): 1 when the transcript has a tool
  result that is not an error (`options.name`: from that tool), else 0.

With `grpo.environment` every reward also gets `transcript`, the episode's messages
(`train.grpo_env`), and `completion` is the last model turn.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

RewardFunction = Callable[..., float]

# A number as written in an answer: thousands groups, a decimal part, or a fraction.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.S)


def parse_number(text: str) -> Fraction | None:
    """The number `text` writes (after NFKC: full-width digits become ASCII), exactly, or None."""
    m = _NUMBER.fullmatch(unicodedata.normalize("NFKC", text).strip())
    return _fraction(m.group()) if m else None


def last_number(text: str) -> Fraction | None:
    """The last number written in `text`, exactly (see `parse_number`), or None."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    return _fraction(found[-1]) if found else None


def _fraction(token: str) -> Fraction | None:
    try:
        return Fraction(token.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


# ----------------------------------------------------------------------------- built-ins

def exact_answer(prompt: Any, completion: str, answer: Any = None, **_: Any) -> float:
    if answer is None:
        raise LmforgeError("the exact_answer reward needs an 'answer' field on every prompt line")
    expected = Fraction(answer).limit_denominator(10**9) if isinstance(answer, (int, float)) \
        else parse_number(str(answer)) or last_number(str(answer))
    got = last_number(completion)
    return float(got is not None and expected is not None and got == expected)


def regex(prompt: Any, completion: str, pattern: str = "", full: bool = False, **_: Any) -> float:
    compiled = _compiled(pattern)
    found = compiled.fullmatch(completion.strip()) if full else compiled.search(completion)
    return float(found is not None)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def fenced(text: str, languages: tuple[str, ...]) -> str:
    """The body of the first ``` fence whose language is one of `languages` (or unnamed), else `text`."""
    for lang, body in _FENCE.findall(text):
        if lang.lower() in languages or not lang:
            return body
    return text


def json_schema(prompt: Any, completion: str, schema: dict | None = None, **fields: Any) -> float:
    schema = schema if schema is not None else fields.get("schema")
    if not isinstance(schema, dict):
        raise LmforgeError("the json_schema reward needs options.schema or a 'schema' field (a JSON schema object)")
    try:
        value = json.loads(fenced(completion, ("json",)).strip())
    except ValueError:
        return 0.0
    return float(_validator(json.dumps(schema, sort_keys=True)).is_valid(value))


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str):
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LmforgeError(f"the json_schema reward's schema is not a valid JSON schema: {e.message}") from None
    return cls(schema)


def code_tests(prompt: Any, completion: str, tests: str | None = None, timeout: float = 5.0,
               memory_mb: int = 512, **_: Any) -> float:
    from lmforge.eval.sandbox import run_python

    if not isinstance(tests, str):
        raise LmforgeError("the code_tests reward needs a 'tests' field (Python asserts) on every prompt line")
    program = fenced(completion, ("python", "py")) + "\n\n" + tests + "\n"
    return float(run_python(program, timeout=timeout, memory_mb=memory_mb).passed)


def tool_used(prompt: Any, completion: str, transcript: list[dict] | None = None, name: str | None = None,
              **_: Any) -> float:
    if transcript is None:
        raise LmforgeError("the tool_used reward reads the tool-use transcript: set grpo.environment")
    return float(any(m.get("role") == "tool" and (name is None or m.get("name") == name)
                     and not str(m.get("content", "")).startswith("error:") for m in transcript))


BUILTINS: dict[str, RewardFunction] = {"exact_answer": exact_answer, "regex": regex, "json_schema": json_schema,
                                       "code_tests": code_tests, "tool_used": tool_used}


# ----------------------------------------------------------------------------- from a recipe

@dataclass
class Reward:
    name: str  # as the recipe wrote it; metrics are reward/<name>
    weight: float
    function: RewardFunction

    def __call__(self, prompt: Any, completion: str, fields: dict[str, Any]) -> float:
        try:
            value = self.function(prompt, completion, **fields)
        except LmforgeError:
            raise
        except Exception as e:
            raise LmforgeError(f"reward {self.name} raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LmforgeError(f"reward {self.name} returned {value!r}; a reward must be a finite number")
        return float(value)


def load_function(reference: str) -> RewardFunction:
    """A built-in's name, `package.module:function`, or `path/to/file.py:function`."""
    if reference in BUILTINS:
        return BUILTINS[reference]
    where, sep, name = reference.rpartition(":")
    if not sep or not where or not name:
        raise LmforgeError(f"reward {reference!r}: expected a built-in ({', '.join(BUILTINS)}), module:function or "
                           "file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise LmforgeError(f"reward {reference!r}: {path} does not exist")
        module_name = f"lmforge_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise LmforgeError(f"reward {reference!r}: importing {path} raised {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise LmforgeError(f"reward {reference!r}: cannot import {where} ({e}); is it on PYTHONPATH?") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise LmforgeError(f"reward {reference!r}: {where} has no function {name}")
    return function


def build_rewards(specs) -> list[Reward]:
    """The recipe's reward specs (`grpo.rewards`) as callables; errors name the bad one."""
    if not specs:
        raise LmforgeError("grpo.rewards is empty: name at least one reward (e.g. exact_answer)")
    rewards, names = [], set()
    for spec in specs:
        function = load_function(spec.function)
        if spec.options:
            function = functools.partial(function, **spec.options)
        name = spec.function.rpartition(":")[2] if spec.function not in BUILTINS else spec.function
        while name in names:
            name += "_"
        names.add(name)
        rewards.append(Reward(name, spec.weight, function))
    if any(s.function == "regex" and "pattern" not in s.options for s in specs):
        raise LmforgeError("the regex reward needs options.pattern")
    for s in specs:
        if s.function == "regex":
            try:
                _compiled(s.options["pattern"])
            except re.error as e:
                raise LmforgeError(f"the regex reward's pattern {s.options['pattern']!r} is invalid: {e}") from None
        if s.function == "json_schema" and "schema" in s.options:
            _validator(json.dumps(s.options["schema"], sort_keys=True))
    return rewards
