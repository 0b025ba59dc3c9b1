"""Request bodies of the OpenAI-compatible API, as pydantic models (they make /openapi.json).

Types are strict (no "5" for 5) and every number has bounds, so malformed or absurd input
fails validation with a 400 before it reaches the engine. The server's own caps (prompt
tokens, max_tokens, n, ...) are checked in `app.py`, since they are settings.

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which is no Unicode text: no tokenizer
encodes it and no response can echo it as UTF-8, so a request holding one anywhere is
refused as a whole, naming where.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

SEED_MAX = 2**63 - 1
INT_MAX = 2**31 - 1

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT_MAX)]], Field(min_length=1)]


class Body(BaseModel):
    # Unknown fields are ignored, as clients send OpenAI parameters we do not implement
    # (user, logit_bias, ...); every field we read is validated strictly.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def find_lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, what) for the first string in a JSON value that holds a lone surrogate, or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, f"\\u{ord(value[e.start]):04x} at character {e.start}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (str, list, dict)):
            name = str(key)[:64].encode("ascii", "backslashreplace").decode()  # keys are the client's too
            found = find_lone_surrogate(item, f"{path}.{name}" if path else name)
            if found:
                return found
    return None


class RequestBody(Body):
    """A whole request body (not a part of one)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found:
            where, what = found
            raise PydanticCustomError("lone_surrogate", "{where} holds a lone UTF-16 surrogate ({what}), which is not "
                                      "Unicode text; send valid UTF-8", {"where": where, "what": what})
        return data


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(RequestBody):
    model: str = Field(max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT_MAX, description="0 or -1: off (an lmforge extension)")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1: off (an lmforge extension)")
    n: int = Field(1, ge=1, le=INT_MAX)
    stop: str | list[Annotated[str, Field(max_length=1024)]] | None = Field(None, max_length=1024)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0, le=INT_MAX)
    logprobs: int | None = Field(None, ge=0, le=INT_MAX, description="How many alternatives to return per token")
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs)")


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=INT_MAX)
    max_completion_tokens: int | None = Field(None, ge=0, le=INT_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT_MAX)


class TokenizeRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    tokens: list[Annotated[int, Field(ge=0, le=INT_MAX)]]
