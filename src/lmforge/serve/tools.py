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
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import llguidance

from lmforge.serve.errors import APIError
from lmforge.serve.protocol import ChatMessage, ChatRequest, Tool
from lmforge.serve.structured import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
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
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
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


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class CallParser:
    """Splits a reply, as it streams, into content and tool calls. Text that may begin a
    call block is held back until it is known; a block that does not parse as a call to one
    of the tools stays content. Whitespace around calls is dropped."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buffer = ""
        self.in_call = False
        self.space = ""  # whitespace held until more content comes
        self.calls: list[ParsedCall] = []

    def _content(self, text: str, out: list) -> None:
        text = self.space + text
        kept = text.rstrip()
        if kept:
            out.append(kept)
        self.space = text[len(kept):]

    def _call(self, raw: str) -> ParsedCall | None:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if not (isinstance(obj, dict) and obj.get("name") in self.names and isinstance(obj.get("arguments", {}), dict)):
            return None
        return ParsedCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))

    def feed(self, text: str) -> list[str | ParsedCall]:
        """What is now known: content strings and complete calls, in order."""
        self.buffer += text
        out: list[str | ParsedCall] = []
        while True:
            if not self.in_call:
                i = self.buffer.find(OPEN)
                if i < 0:
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                                 if OPEN.startswith(self.buffer[-k:])), 0)
                    cut = len(self.buffer) - keep
                    if cut:
                        self._content(self.buffer[:cut], out)
                    self.buffer = self.buffer[cut:]
                    return out
                if i:
                    self._content(self.buffer[:i], out)
                self.buffer, self.in_call = self.buffer[i + len(OPEN):], True
            j = self.buffer.find(CLOSE)
            if j < 0:
                return out
            raw, self.buffer, self.in_call = self.buffer[:j], self.buffer[j + len(CLOSE):], False
            call = self._call(raw)
            if call is None:
                self._content(OPEN + raw + CLOSE, out)
            else:
                self.space = ""
                self.calls.append(call)
                out.append(call)

    def finish(self) -> list[str | ParsedCall]:
        """The rest, at the end of the reply (an unfinished block is content)."""
        rest = (OPEN if self.in_call else "") + self.buffer
        self.buffer, self.in_call = "", False
        out: list[str | ParsedCall] = []
        if rest.strip():
            self._content(rest, out)
        if self.space and not self.calls:  # a reply without calls keeps its text as written
            out.append(self.space)
        self.space = ""
        return out
