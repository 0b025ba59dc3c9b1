"""Tool calling in chat: the tools into the prompt, calls out of the output.

The format is Hermes' (Qwen 2.5/3, Hermes 2/3): a call is a JSON object between tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. A chat template that takes `tools` (HF's convention) gets them and
describes them itself; for one that does not, a system message describes them and asks for
that format, and earlier calls and tool results are written in it (`<tool_response>`).

`tool_choice`: "none" leaves the tools out of the prompt; "auto" (the default with tools)
lets the model answer or call, and the calls are parsed from its output; "required" and a
named function constrain decoding with a grammar (infer.grammar) so that the output is one
call, or with `parallel_tool_calls` up to MAX_CALLS, whose arguments follow the tools'
parameter schemas.

Two more output formats, chosen by the chat template (`format_of`; a template that does
not take tools always gets Hermes' through the system message):

- Llama 3.1 (the template mentions `<|python_tag|>` or the `ipython` role): a reply that
  is calls is JSON objects `{"name": ..., "parameters": {...}}`, `;` between several,
  optionally after `<|python_tag|>`; tool results go back in the `ipython` role (the
  template maps `tool` messages to it).
- Mistral (the template mentions `[TOOL_CALLS]` or `[AVAILABLE_TOOLS]`): content, then
  `[TOOL_CALLS]` and a JSON array of `{"name": ..., "arguments": {...}}`; call ids are 9
  letters and digits, which Mistral's templates require of the ids sent back.

Their markers are special tokens in those models' tokenizers, which decoded text leaves out,
so the parsers also take the calls without them: a Llama reply that starts with `{`, a
Mistral reply that starts with `[`. Such a reply is held back while streaming until it ends,
then is calls if it parses as calls to the tools, else content. Forced calls in these
formats are the bare JSON (object(s) or array) that the grammar allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from lmforge.infer.tool_calls import CLOSE, OPEN, CallParser, ParsedCall, response_block  # noqa: F401 (serve's API)
from lmforge.serve.errors import APIError
from lmforge.serve.protocol import ChatMessage, ChatRequest, Tool
from lmforge.serve.structured import JSON_OPTIONS

# The most calls a forced reply holds: a model that would go on calling is stopped by the
# grammar, not by max_tokens with a call cut in half.
MAX_CALLS = 8


@dataclass
class ToolPlan:
    """What a chat request does with its tools."""

    tools: list[Tool]
    choice: str  # "none", "auto", "required" or "function"
    function: str | None = None  # the one function to call, when choice == "function"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}


def plan_of(body: ChatRequest) -> ToolPlan:
    tools = body.tools or []
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise APIError(400, f"two tools are named '{dup}'; tool names must differ", param="tools")
    tc = body.tool_choice
    if tc is None:
        choice, function = ("auto" if tools else "none"), None
    elif isinstance(tc, str):
        choice, function = tc, None
    else:
        choice, function = "function", tc.function.name
    if choice in ("required", "function") and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    if function is not None and function not in names:
        raise APIError(400, f"tool_choice names the function '{function[:64]}', which is not in tools",
                       param="tool_choice")
    plan = ToolPlan(tools, choice, function, body.parallel_tool_calls)
    if plan.forced and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"tool_choice {choice!r} and response_format both constrain the output; give one",
                       param="response_format")
    return plan


def call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": tool.function.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(plan: ToolPlan) -> str:
    """A grammar whose sentences are tool-call blocks (one, or several when parallel) for the
    functions the plan allows, their arguments following each function's schema."""
    tools = [t for t in plan.tools if plan.function is None or t.function.name == plan.function]
    schema = call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [call_schema(t) for t in tools]}
    schema["x-guidance"] = JSON_OPTIONS
    repeat = f' ("\\n" call)~0..{MAX_CALLS - 1}' if plan.parallel else ""
    lark = (f"start: call{repeat}\n"
            f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}\n"
            f"body: %json {json.dumps(schema)}\n")
    return llguidance.LLMatcher.grammar_from_lark(lark)


def describe_tools(tools: list[Tool]) -> str:
    """The system message that brings tools to a template that does not take them."""
    specs = "\n".join(json.dumps(tool_dict(t), ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to answer. The functions, as JSON schemas:\n<tools>\n"
            f"{specs}\n</tools>\nTo call a function, answer with a JSON object of its name and arguments "
            f"between tags, one block per call:\n{OPEN}\n"
            '{"name": <function-name>, "arguments": <arguments-object>}\n' f"{CLOSE}")


def tool_dict(tool: Tool) -> dict[str, Any]:
    return tool.model_dump(exclude_none=True, by_alias=True)


def _arguments(text: str) -> Any:
    """A call's arguments as the template wants them (an object), or the text if not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def call_block(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def conversation(messages: list[ChatMessage], plan: ToolPlan, template_takes_tools: bool) -> list[dict[str, Any]]:
    """The messages as the chat template gets them: HF's shape (assistant `tool_calls` with
    object arguments, `tool` messages) for a template that takes tools, else plain text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text = m.text()
        if template_takes_tools:
            d: dict[str, Any] = {"role": m.role, "content": text}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        elif m.role == "tool":
            out.append({"role": "user", "content": response_block(text)})
        elif m.tool_calls:
            blocks = [call_block(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls]
            out.append({"role": m.role, "content": "\n".join(([text] if text else []) + blocks)})
        else:
            out.append({"role": m.role, "content": text})
    if plan.active and not template_takes_tools:
        system = describe_tools(plan.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def takes_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (HF's convention)."""
    return template is not None and "tools" in template


# -- Llama 3.1 and Mistral -------------------------------------------------------------------------------
PYTHON_TAG, TOOL_CALLS = "<|python_tag|>", "[TOOL_CALLS]"


def _json_grammar(start: str, schema: dict[str, Any]) -> str:
    schema["x-guidance"] = JSON_OPTIONS
    return llguidance.LLMatcher.grammar_from_lark(f"{start}\nbody: %json {json.dumps(schema)}\n")


def _allowed(plan: ToolPlan) -> list[Tool]:
    return [t for t in plan.tools if plan.function is None or t.function.name == plan.function]


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _decode_all(text: str, sep: str) -> list[Any] | None:
    """The JSON values of `text`, separated by whitespace and optionally `sep`; None unless it is
    nothing but those."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (values and text[i] == sep)):
            i += 1
        if i == len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


class _HeldParser:
    """A parser for formats whose calls end the reply: content streams until a marker (or a
    reply that starts like a call), the rest is held to the end and parsed then."""

    marker: str = ""
    start_char: str = ""

    def __init__(self, names: set[str], forced: bool = False):
        self.names, self.forced = names, forced
        self.streamed = ""  # content already given out
        self.held = ""  # text from the marker (or a call-like start) on
        self.holding = forced
        self.calls: list[ParsedCall] = []

    def _calls(self, text: str) -> list[ParsedCall] | None:
        raise NotImplementedError

    def feed(self, text: str) -> list[str | ParsedCall]:
        if self.holding:
            self.held += text
            return []
        pending, self.held = self.held + text, ""
        if not self.streamed:
            head = pending.lstrip()
            if not head or (len(head) < len(self.marker) and self.marker.startswith(head)):
                self.held = pending  # not known yet whether the reply is content or calls
                return []
            if head.startswith((self.start_char, self.marker)):
                self.held, self.holding = pending, True
                return []
        i = pending.find(self.marker)
        if i >= 0:
            out = pending[:i].rstrip()
            self.held, self.holding = pending[len(out):], True
        else:  # hold what may begin the marker, and trailing whitespace (dropped before calls)
            keep = next((k for k in range(min(len(self.marker) - 1, len(pending)), 0, -1)
                         if self.marker.startswith(pending[-k:])), 0)
            cut = len(pending[:len(pending) - keep].rstrip())
            self.held, out = pending[cut:], pending[:cut]
        self.streamed += out
        return [out] if out else []

    def finish(self) -> list[str | ParsedCall]:
        rest, self.held, self.holding = self.held, "", False
        calls = self._calls(rest.strip()) if rest.strip() else None
        if calls:
            self.calls = calls
            return list(calls)
        return [rest] if rest else []

    def _named(self, values: list[Any], key: str, make) -> list[ParsedCall] | None:
        calls = []
        for v in values:
            if not (isinstance(v, dict) and v.get("name") in self.names and isinstance(v.get(key, {}), dict)):
                return None
            calls.append(make(v["name"], json.dumps(v.get(key, {}), ensure_ascii=False)))
        return calls or None


class LlamaParser(_HeldParser):
    marker, start_char = PYTHON_TAG, "{"

    def _calls(self, text: str) -> list[ParsedCall] | None:
        text = text.removeprefix(PYTHON_TAG)
        values = _decode_all(text, ";")
        if values is None:
            return None
        # Llama 3.1 writes "parameters"; some fine-tunes write "arguments".
        key = "parameters" if all(isinstance(v, dict) and "parameters" in v for v in values) else "arguments"
        return self._named(values, key, ParsedCall)


class MistralParser(_HeldParser):
    marker, start_char = TOOL_CALLS, "["

    def _calls(self, text: str) -> list[ParsedCall] | None:
        values = _decode_all(text.removeprefix(TOOL_CALLS), ",")
        if not values or not all(isinstance(v, list) for v in values):
            return None
        return self._named([c for v in values for c in v], "arguments", ParsedCall.short_id)


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: its name, the grammar of a forced reply, its parser."""

    name: str

    def grammar(self, plan: ToolPlan) -> str:
        tools = _allowed(plan)
        more = MAX_CALLS - 1 if plan.parallel else 0
        if self.name == "llama3":
            schema = _one_of([{"type": "object", "properties": {"name": {"const": t.function.name},
                                                                "parameters": t.function.parameters},
                               "required": ["name", "parameters"], "additionalProperties": False} for t in tools])
            return _json_grammar(f'start: body ("; " body)~0..{more}', schema)
        if self.name == "mistral":
            return _json_grammar(f'start: "[" body (", " body)~0..{more} "]"', _one_of([call_schema(t) for t in tools]))
        return call_grammar(plan)

    def parser(self, plan: ToolPlan) -> CallParser | _HeldParser:
        if self.name == "llama3":
            return LlamaParser(plan.names(), plan.forced)
        if self.name == "mistral":
            return MistralParser(plan.names(), plan.forced)
        return CallParser(plan.names())


HERMES, LLAMA3, MISTRAL = ToolFormat("hermes"), ToolFormat("llama3"), ToolFormat("mistral")


def format_of(template: str | None) -> ToolFormat:
    """The tool-call format of a chat template: Llama 3.1's or Mistral's when the template
    carries their markers and takes `tools`, else Hermes'."""
    if not takes_tools(template):
        return HERMES
    if PYTHON_TAG in template or "ipython" in template:
        return LLAMA3
    if TOOL_CALLS in template or "[AVAILABLE_TOOLS]" in template:
        return MISTRAL
    return HERMES
