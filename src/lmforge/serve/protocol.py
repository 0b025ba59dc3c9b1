"""Request bodies of the OpenAI-compatible API, as pydantic models (they make /openapi.json).

Types are strict (no "5" for 5) and every number has bounds, so malformed or absurd input
fails validation with a 400 before it reaches the engine. The server's own caps (max_tokens,
n, stop strings, logprobs, ...) are settings: `check_limits` holds a body to them, and the
bodies' methods check what spans fields; both raise `APIError`. (Prompt tokens are counted in
prompts.py, which tokenizes.)

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which is no Unicode text: no tokenizer
encodes it and no response can echo it as UTF-8, so a request holding one anywhere is
refused as a whole, naming where.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lmforge.serve.errors import APIError
from lmforge.serve.settings import ServeSettings

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


JsonValue = dict[str, Any]
GRAMMAR_TEXT_MAX = 100_000  # characters of a regex or Lark grammar


class JsonSchemaFormat(Body):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=GRAMMAR_TEXT_MAX)
    json_schema: JsonValue = Field(alias="schema", description="The JSON schema the output must follow")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredFields(Body):
    """What the output must follow: OpenAI's response_format, or one of vLLM's guided_* fields
    (lmforge extensions; serve.structured turns them into a grammar)."""

    response_format: ResponseFormat | None = None
    guided_json: JsonValue | str | None = Field(None, description="A JSON schema (object or text) the output follows")
    guided_regex: str | None = Field(None, max_length=GRAMMAR_TEXT_MAX, description="A regex the output matches")
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        None, min_length=1, max_length=1024, description="The output is one of these strings")
    guided_grammar: str | None = Field(None, max_length=GRAMMAR_TEXT_MAX,
                                       description="A Lark grammar (llguidance's dialect) the output follows")


class SamplingFields(RequestBody, StructuredFields):
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

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, one or several, each a text or token ids."""
        p = self.prompt
        prompts: list[str | list[int]] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "the prompt list is empty", param="prompt")
        return prompts


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str = Field(max_length=256)
    arguments: str = Field(description="The arguments as a JSON object in text")


class ToolCall(Body):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=1024, description="An assistant's earlier calls")
    tool_call_id: str | None = Field(None, max_length=256, description="The call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionSpec(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(None, max_length=GRAMMAR_TEXT_MAX)
    parameters: JsonValue = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                  description="A JSON schema of the arguments object")
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Body):
    name: str = Field(max_length=64)


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(None, ge=0, le=INT_MAX)
    max_completion_tokens: int | None = Field(None, ge=0, le=INT_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT_MAX)

    def logprob_alternatives(self) -> int | None:
        """How many alternatives to return per token (0: only the token's), None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    def check_one_input(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give either a prompt or messages", param="prompt")


class DetokenizeRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    tokens: list[Annotated[int, Field(ge=0, le=INT_MAX)]]


def check_model(name: str | None, settings: ServeSettings, adapters: list[str] | tuple[str, ...] = ()) -> None:
    """A request naming a model must name the one served or one of its LoRA adapters."""
    if name is not None and name != settings.model_name and name not in adapters:
        served = ", ".join(f"'{n}'" for n in [settings.model_name, *adapters][:20])
        raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves {served}",
                       "not_found_error", "model", "model_not_found")


def check_limits(body: SamplingFields, prompts: int, max_tokens: int | None, logprobs: int | None,
                 settings: ServeSettings) -> list[str]:
    """Hold a generation request (`prompts` prompts, each sampled body.n times) to the
    server's caps; returns its stop strings as a list."""
    if body.n > settings.max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {settings.max_n}", param="n")
    if prompts * body.n > settings.max_choices:
        raise APIError(400, f"{prompts} prompts x n={body.n} is more than the {settings.max_choices} "
                       "completions one request may ask for", param="prompt")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop:
        raise APIError(400, f"{len(stop)} stop strings; at most {settings.max_stop}", param="stop")
    if any(not s for s in stop):
        raise APIError(400, "a stop string is empty", param="stop")
    if logprobs is not None and logprobs > settings.max_logprobs:
        raise APIError(400, f"logprobs is {logprobs}; at most {settings.max_logprobs}", param="logprobs")
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}",
                       param="max_tokens")
    return stop



Inputs = Annotated[str | list[str] | TokenIds | list[TokenIds], Field(
    description="A string, a list of strings, a list of token ids, or a list of token-id lists")]


def listed_inputs(x: str | list, most: int) -> list:
    """A request's `input`, one or several (each a text or token ids), at most `most` of them."""
    inputs = [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)
    if not inputs:
        raise APIError(400, "the input list is empty", param="input")
    if len(inputs) > most:
        raise APIError(400, f"{len(inputs)} inputs; this server takes at most {most} in one request", param="input")
    return inputs


class EmbeddingRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT_MAX, description="Truncate each vector to this length "
                                   "(the lengths the model allows: its width, and those it was trained for)")


class ClassifyRequest(RequestBody):
    """POST /v1/classify (an lmforge route): each input's label under the model's classification head."""

    model: str | None = Field(None, max_length=256)
    input: Inputs


class TagRequest(RequestBody):
    """POST /v1/tag (an lmforge route): each text's words tagged and its entities, with character offsets."""

    model: str | None = Field(None, max_length=256)
    input: str | list[str] = Field(description="A text or a list of texts")
