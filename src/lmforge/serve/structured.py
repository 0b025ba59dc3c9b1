"""Structured outputs: a request's response_format or guided_* field as a grammar the engine
enforces while decoding (infer.grammar).

Spelled as OpenAI does (`response_format`: `json_schema` or `json_object`) or with vLLM's
extension fields: `guided_json` (a JSON schema), `guided_regex`, `guided_choice` (a list of
strings) and `guided_grammar` (a Lark grammar, llguidance's dialect). One of them per request.
A schema, regex or grammar that cannot be used is a 400 that names its field.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
from starlette.concurrency import run_in_threadpool

from lmforge.infer.grammar import GrammarError, check_grammar
from lmforge.serve.errors import APIError
from lmforge.serve.protocol import StructuredFields

# Compact JSON: a random or small model given the freedom of whitespace spends tokens on it.
JSON_OPTIONS = {"whitespace_flexible": False}


def json_schema_grammar(schema: dict[str, Any] | bool, field: str) -> str:
    """The grammar of JSON text following this schema (a 400 naming `field` if it is not a schema)."""
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{field} must be a JSON schema (an object)", param=field)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise APIError(400, f"{field} is not a usable JSON schema: {e}", param=field) from None


def choice_grammar(choices: list[str]) -> str:
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def requested_grammar(body: StructuredFields) -> tuple[str, str] | None:
    """(grammar, the field it came from) for the request's constraint, or None."""
    given = []
    rf = body.response_format
    if rf is not None and rf.type != "text":
        given.append("response_format")
    given += [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
              if getattr(body, name) is not None]
    if len(given) > 1:
        raise APIError(400, f"{' and '.join(given)} both constrain the output; give one of them", param=given[1])
    if not given:
        return None
    field = given[0]
    if field == "response_format":
        assert rf is not None
        if rf.type == "json_object":
            return json_schema_grammar({"type": "object"}, field), field
        if rf.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema "
                           '({"name": ..., "schema": {...}})', param="response_format.json_schema")
        return json_schema_grammar(rf.json_schema.json_schema, "response_format.json_schema.schema"), field
    if field == "guided_json":
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise APIError(400, f"guided_json is not JSON: {e}", param=field) from None
        return json_schema_grammar(schema, field), field
    if field == "guided_regex":
        return llguidance.LLMatcher.grammar_from_regex(body.guided_regex or ""), field
    if field == "guided_choice":
        return choice_grammar(body.guided_choice or []), field
    return llguidance.LLMatcher.grammar_from_lark(body.guided_grammar or ""), field


async def checked(grammar: str, field: str) -> str:
    """The grammar, if llguidance can use it; else a 400 naming the field (checked in a worker
    thread: a large schema takes milliseconds)."""
    try:
        await run_in_threadpool(check_grammar, grammar)
    except GrammarError as e:
        what = "JSON schema" if field in ("response_format", "guided_json") else field.removeprefix("guided_")
        raise APIError(400, f"{field}: not a usable {what}: {str(e).strip()[:2000]}", param=field) from None
    return grammar


async def grammar_of(body: StructuredFields) -> str | None:
    """The request's output grammar, checked, or None when its output is free."""
    found = requested_grammar(body)
    return None if found is None else await checked(*found)
