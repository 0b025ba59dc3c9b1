"""Hermes tool calls in model output (Qwen 2.5/3, Hermes 2/3): a call is a JSON object between tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, and a tool's result goes back as `<tool_response>` text. The parser is
shared by the server (`serve.tools`, which adds prompts, grammars and the other formats) and by
tool-use training (`train.grpo_env`), so a model is trained on the calls it is served with.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def response_block(text: str) -> str:
    """A tool's result as the model reads it."""
    return f"<tool_response>\n{text}\n</tool_response>"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    @classmethod
    def short_id(cls, name: str, arguments: str) -> ParsedCall:
        """A call whose id is 9 letters and digits (what Mistral's templates accept)."""
        alphabet = string.ascii_letters + string.digits
        return cls(name, arguments, "".join(secrets.choice(alphabet) for _ in range(9)))

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
