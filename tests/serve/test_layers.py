"""The server's layers on their own, without building an app: the protocol's checks, the
response shapes (logprobs, SSE frames, the error shape), the prompt encoder, and the
completion and chat services over a scripted engine (serve.engine_api's interface)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from lmforge.infer.engine import EngineOverloaded, Event, TokenLogprob
from lmforge.serve import sse
from lmforge.serve.errors import APIError, error_body, validation_message
from lmforge.serve.logprobs import chat_logprobs, completion_logprobs
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.prompts import PromptEncoder
from lmforge.serve.protocol import ChatRequest, CompletionRequest, TokenizeRequest, check_limits, check_model
from lmforge.serve.services.chat import ChatService
from lmforge.serve.services.completions import CompletionService
from lmforge.serve.services.generation import GenerationService
from lmforge.serve.settings import ServeSettings

NAMES = {1: "Hé", 2: "llo", 3: " 世界", 4: "!"}


def text_of(token: int) -> str:
    return NAMES[token]


def raises(status: int, param: str | None, fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert (info.value.status, info.value.param) == (status, param), info.value.message
    return info.value


# -- response shapes ---------------------------------------------------------------------------------
def test_completion_logprobs_are_parallel_lists_with_text_offsets():
    entries = [(None, 1),  # a prompt's first token has no logprob
               (TokenLogprob(2, -0.5, [(3, -0.25), (2, -0.5)]), 2),
               (TokenLogprob(3, float("-inf"), [(4, -0.1)]), 3)]
    lp = completion_logprobs(entries, 10, text_of)
    assert lp["tokens"] == ["Hé", "llo", " 世界"]
    assert lp["text_offset"] == [10, 12, 15]  # characters, not bytes
    assert lp["token_logprobs"] == [None, -0.5, -1e30]  # JSON has no -inf
    assert lp["top_logprobs"] == [None, {" 世界": -0.25, "llo": -0.5}, {"!": -0.1, " 世界": -1e30}]
    json.dumps(lp, allow_nan=False)


def test_chat_logprobs_carry_utf8_bytes_and_alternatives():
    lp = chat_logprobs([TokenLogprob(3, -1.5, [(3, -1.5), (4, -2.0)])], text_of)
    (entry,) = lp["content"]
    assert entry["token"] == " 世界" and entry["logprob"] == -1.5
    assert bytes(entry["bytes"]).decode("utf-8") == " 世界" and len(entry["bytes"]) == 7
    assert [(t["token"], t["logprob"]) for t in entry["top_logprobs"]] == [(" 世界", -1.5), ("!", -2.0)]


def test_sse_frames_keep_text_as_utf8_and_end_with_done():
    assert sse.frame({"text": "世界"}) == 'data: {"text": "世界"}\n\n'
    assert sse.DONE == "data: [DONE]\n\n"
    err = sse.error_frame(APIError(500, "generation failed", "server_error", param="x", code="c"))
    assert err.startswith("data: ") and err.endswith("\n\n")
    assert json.loads(err[len("data: "):]) == {"error": {"message": "generation failed", "type": "server_error",
                                                         "param": None, "code": "c"}}
    assert sse.SSE_HEADERS["X-Accel-Buffering"] == "no"


def test_error_body_is_openai_shape():
    assert json.loads(error_body("too big", "body_too_large")) == {
        "error": {"message": "too big", "type": "invalid_request_error", "param": None, "code": "body_too_large"}}


def test_validation_message_names_the_first_problem_and_counts_the_rest():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": "hot", "n": 0})
    message, param = validation_message(info.value.errors())
    assert param == "temperature" and message.startswith("temperature: ")
    assert message.endswith(" (and 1 more problems)")

    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": ["fine", "a\ud800"]})
    message, param = validation_message(info.value.errors())
    assert param == "prompt.1"
    assert message == ("prompt.1 holds a lone UTF-16 surrogate (\\ud800 at character 1), which is not Unicode "
                       "text; send valid UTF-8")

    assert validation_message([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error"}]) == (
        "the body is not valid JSON", None)


# -- the protocol's checks ---------------------------------------------------------------------------
def test_limits_are_checked_in_order_against_the_settings():
    settings = ServeSettings(model_name="m", max_n=2, max_choices=3, max_stop=2, max_logprobs=5, max_tokens=100)

    def body(**fields):
        return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})

    assert check_limits(body(stop="\n"), 1, 10, None, settings) == ["\n"]
    assert check_limits(body(stop=["a", "b"], n=2), 1, 100, 5, settings) == ["a", "b"]
    assert "at most 2" in raises(400, "n", check_limits, body(n=3), 1, 10, None, settings).message
    e = raises(400, "prompt", check_limits, body(n=2), 2, 10, None, settings)
    assert e.message == "2 prompts x n=2 is more than the 3 completions one request may ask for"
    raises(400, "stop", check_limits, body(stop=["a", "b", "c"]), 1, 10, None, settings)
    assert raises(400, "stop", check_limits, body(stop=["a", ""]), 1, 10, None, settings).message == \
        "a stop string is empty"
    raises(400, "logprobs", check_limits, body(), 1, 10, 6, settings)
    raises(400, "max_tokens", check_limits, body(), 1, 101, None, settings)
    # n is checked before the stop strings: the first problem is the one reported
    raises(400, "n", check_limits, body(n=3, stop=""), 1, 101, 6, settings)


def test_request_bodies_check_what_spans_fields():
    def completion(prompt):
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt})

    assert completion("hi").prompt_list() == ["hi"]
    assert completion([5, 6]).prompt_list() == [[5, 6]]
    assert completion([[5], [6, 7]]).prompt_list() == [[5], [6, 7]]
    assert completion(["a", "b"]).prompt_list() == ["a", "b"]
    assert raises(400, "prompt", completion([]).prompt_list).message == "the prompt list is empty"

    def chat(**fields):
        return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})

    assert chat().logprob_alternatives() is None
    assert chat(logprobs=True).logprob_alternatives() == 0
    assert chat(logprobs=True, top_logprobs=3).logprob_alternatives() == 3
    raises(400, "top_logprobs", chat(top_logprobs=3).logprob_alternatives)
    assert chat(max_tokens=5, max_completion_tokens=7).token_limit() == 7
    assert chat(max_tokens=5).token_limit() == 5

    TokenizeRequest.model_validate({"prompt": "hi"}).check_one_input()
    raises(400, "prompt", TokenizeRequest.model_validate({}).check_one_input)
    both = TokenizeRequest.model_validate({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
    raises(400, "prompt", both.check_one_input)

    settings = ServeSettings(model_name="tiny")
    check_model(None, settings)
    check_model("tiny", settings)
    e = raises(404, "model", check_model, "gpt-4o", settings)
    assert e.code == "model_not_found" and e.message == "the model 'gpt-4o' does not exist; this server serves 'tiny'"


# -- prompts -----------------------------------------------------------------------------------------
def test_prompt_encoder_refuses_by_size_and_by_count(tiny):
    model, tokenizer = tiny
    prompts = PromptEncoder(tokenizer, context=128, vocab=model.config.vocab, max_prompt_tokens=None)
    assert prompts.max_prompt_tokens == 127
    assert prompts.bytes_per_token  # a byte-level BPE has a bound

    text = "ROMEO: But soft, what light through yonder window breaks? 世界"
    (ids,) = asyncio.run(prompts.encode([text]))
    assert ids == tokenizer.encode(text) and prompts.text(ids) == tokenizer.decode(ids)

    huge = "ab" * (127 * prompts.bytes_per_token)
    with pytest.raises(APIError) as info:
        asyncio.run(prompts.encode(["short", huge]))
    assert info.value.code == "context_length_exceeded"
    assert info.value.message.startswith(f"the prompt has {len(huge)} bytes, more than 127 tokens can hold")

    with pytest.raises(APIError) as info:
        asyncio.run(prompts.encode([[1] * 128]))
    assert info.value.message == ("the prompt has 128 tokens; this server takes at most 127 tokens "
                                  "(the model's context is 128)")
    vocab = model.config.vocab
    with pytest.raises(APIError, match=rf"outside the vocabulary \[0, {vocab}\)"):
        asyncio.run(prompts.encode([[1, vocab]]))
    with pytest.raises(APIError, match="the prompt is empty"):
        asyncio.run(prompts.encode([""]))


# -- services over a scripted engine ------------------------------------------------------------------
class ScriptedStream:
    def __init__(self, events: list[tuple[int, Event]]):
        self.events, self.cancelled = events, False

    async def __aiter__(self):
        for item in self.events:
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedEngine:
    """The ServingEngine interface, answering every batch with the events of `script(requests)`."""

    alive, queue_depth, running = True, 0, 0

    def __init__(self, tokenizer, script):
        self.tokenizer, self.context, self.script = tokenizer, 128, script
        self.submitted: list = []
        self.streams: list[ScriptedStream] = []

    def start(self):
        return self

    def stop(self) -> None:
        pass

    def stream(self, requests):
        self.submitted.append(requests)
        s = ScriptedStream(self.script(requests))
        self.streams.append(s)
        return s


class Client:
    """What the services read of an HTTP request: whether the client left, and its state."""

    def __init__(self):
        self.state = SimpleNamespace()

    async def is_disconnected(self) -> bool:
        return False


def services(tokenizer, script, **settings):
    engine = ScriptedEngine(tokenizer, script)
    config = ServeSettings(model_name="tiny", **settings)
    prompts = PromptEncoder(tokenizer, engine.context, tokenizer.vocab_size, None)
    generation = GenerationService(engine, config, prompts, ServerMetrics(engine))
    return engine, generation, CompletionService(generation), ChatService(generation)


def lp(token: int, logprob: float) -> TokenLogprob:
    return TokenLogprob(token, logprob, [(token, logprob)])


def test_completion_service_echoes_the_prompt_with_its_logprobs(tiny):
    tokenizer = tiny[1]
    prompt = tokenizer.encode("To be, or not")
    a, b = tokenizer.encode(" to be")[:2]

    def script(requests):
        (r,) = requests
        assert r.prompt == prompt and r.logprobs == 1 and r.prompt_logprobs
        prompt_lps = [None] + [lp(t, -1.0) for t in prompt[1:]]
        return [(0, Event(text=tokenizer.decode([a]), tokens=[lp(a, -0.5)], prompt=prompt_lps)),
                (0, Event(text=tokenizer.decode([b]), tokens=[lp(b, -0.25)], finish_reason="length"))]

    engine, generation, completions, _ = services(tokenizer, script, tokens_per_minute=10_000)
    body = CompletionRequest.model_validate({"model": "tiny", "prompt": "To be, or not", "max_tokens": 2,
                                            "logprobs": 1, "echo": True, "temperature": 0})
    client = Client()
    out = asyncio.run(completions.create(body, client, "key-1"))
    (choice,) = out["choices"]
    generated = tokenizer.decode([a]) + tokenizer.decode([b])
    assert choice["text"] == "To be, or not" + generated and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 2
    assert logprobs["token_logprobs"] == [None] + [-1.0] * (len(prompt) - 1) + [-0.5, -0.25]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][-1] == len(choice["text"]) - len(tokenizer.decode([b]))
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2}
    assert client.state.usage == out["usage"] and engine.streams[0].cancelled
    # what was reserved and not used came back: the bucket is full again but for what ran
    assert generation.token_limiter.take("key-1", 10_000 - len(prompt) - 2) == 0


def test_completion_stream_offsets_continue_across_chunks(tiny):
    tokenizer = tiny[1]
    a, b = tokenizer.encode("ROMEO: But soft")[:2]

    def script(requests):
        return [(0, Event(text=tokenizer.decode([a]), tokens=[lp(a, -0.5)])),
                (0, Event(text=tokenizer.decode([b]), tokens=[lp(b, -0.25)], finish_reason="stop"))]

    _, _, completions, _ = services(tokenizer, script)
    body = CompletionRequest.model_validate({"model": "tiny", "prompt": "But soft", "logprobs": 0, "stream": True,
                                            "stream_options": {"include_usage": True}})

    async def frames():
        return [f async for f in await completions.create(body, Client(), "anonymous")]

    out = asyncio.run(frames())
    assert out[-1] == sse.DONE
    chunks = [json.loads(f[len("data: "):]) for f in out[:-1]]
    first, second, usage = chunks
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [len(tokenizer.decode([a]))]
    assert [c["choices"][0]["finish_reason"] for c in (first, second)] == [None, "stop"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_chat_service_fails_one_request_alone_and_refuses_when_overloaded(tiny):
    tokenizer = tiny[1]

    def failing(requests):
        return [(0, Event(text="Good", tokens=[lp(5, -0.1)])), (0, Event(finish_reason="error", error="boom"))]

    _, _, _, chat = services(tokenizer, failing)
    messages = [{"role": "user", "content": "Tell me about Romeo."}]
    body = ChatRequest.model_validate({"model": "tiny", "messages": messages})
    with pytest.raises(APIError) as info:
        asyncio.run(chat.create(body, Client(), "anonymous"))
    assert (info.value.status, info.value.message) == (500, "generation failed; the server logged it")

    streamed = ChatRequest.model_validate({"model": "tiny", "messages": messages, "stream": True})

    async def frames():
        return [f async for f in await chat.create(streamed, Client(), "anonymous")]

    out = asyncio.run(frames())
    assert sse.DONE not in out
    assert json.loads(out[-1][len("data: "):])["error"]["message"] == "generation failed; the server logged it"
    assert json.loads(out[1][len("data: "):])["choices"][0]["delta"] == {"content": "Good"}

    def overloaded(requests):
        raise EngineOverloaded("the server is at capacity")

    engine, generation, _, chat = services(tokenizer, overloaded, tokens_per_minute=1000)
    with pytest.raises(APIError) as info:
        asyncio.run(chat.create(body, Client(), "key-2"))
    assert (info.value.status, info.value.code, info.value.headers) == (503, "overloaded", {"Retry-After": "1"})
    assert generation.token_limiter.take("key-2", 1000) == 0  # nothing ran: all of it came back
