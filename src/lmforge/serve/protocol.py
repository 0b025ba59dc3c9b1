"""Request bodies of the OpenAI-compatible API, as pydantic models (they make /openapi.json).

Types are strict (no "5" for 5) and every number has bounds, so malformed or absurd input
fails validation with a 400 before it reaches the engine. The server's own caps (prompt
tokens, max_tokens, n, ...) are checked in `app.py`, since they are settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**63 - 1
INT_MAX = 2**31 - 1

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT_MAX)]], Field(min_length=1)]


class Body(BaseModel):
    # Unknown fields are ignored, as clients send OpenAI parameters we do not implement
    # (user, logit_bias, ...); every field we read is validated strictly.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
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


class TokenizeRequest(Body):
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: str | None = Field(None, max_length=256)
    tokens: list[Annotated[int, Field(ge=0, le=INT_MAX)]]
