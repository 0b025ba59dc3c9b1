"""Tool calling in /v1/chat/completions through the official `openai` client (serve.tools).

`required` and a named function are enforced by a grammar, so the random tiny model's calls
always parse and their arguments follow the tool's schema; `auto` parses Hermes-style
<tool_call> blocks from whatever the model writes, which a scripted engine (the server's
engine interface, answering with set text) drives here, streaming and not; `none` leaves
the tools out. Earlier calls and tool results in the history reach the prompt, through a
template that takes `tools` (HF's convention) and through the fallback system message.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_helpers import KEY, MODEL, Server, tiny_model

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.infer.engine import Engine, Event, TokenLogprob
from lmforge.model import Transformer
from lmforge.serve.app import create_app
from lmforge.serve.protocol import ChatMessage, ChatRequest
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings
from lmforge.serve.tools import conversation, plan_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "東京", "Lima"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
FLIGHT = {"type": "function", "function": {
    "name": "find_flight",
    "parameters": {"type": "object", "properties": {"to": {"type": "string", "maxLength": 4},
                                                    "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["to", "seats"], "additionalProperties": False}}}
TOOLS = [WEATHER, FLIGHT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Tokyo, in Celsius?"}]

# A template in the shape of Qwen's: tools into the system turn, calls and results as tags.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>\nCall with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def long_tiny():
    """A random tiny model with room for the tools' descriptions in its context."""
    return tiny_model(context=2048)


def with_template(tokenizer: TextTokenizer, template: str) -> TextTokenizer:
    return TextTokenizer(tokenizer.backend, {**tokenizer.config, "chat_template": template})


def serve(engine) -> Server:
    return Server(create_app(engine, ServeSettings(model_name=MODEL, api_keys=ApiKeys([KEY]))))


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module", params=["fallback", "tools-template"])
def model_server(request, long_tiny):
    model, tokenizer = long_tiny
    if request.param == "tools-template":
        tokenizer = with_template(tokenizer, TOOLS_TEMPLATE)
    with serve(Engine(model, tokenizer)) as s:
        yield s


def streamed(chunks) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish_reason) assembled from a stream of chunks as a client does."""
    content, calls, finish = [], {}, None
    for ch in chunks:
        (choice,) = ch.choices
        content.append(choice.delta.content or "")
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            assert d.type in (None, "function")
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c["id"] and c["name"] in names
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice, parallel", [("required", False), ("required", True), ("get_weather", False),
                                              ("find_flight", True)])
def test_forced_tool_calls_always_parse(model_server, choice, parallel, stream):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    names = set(SCHEMAS) if choice == "required" else {choice}
    for seed in range(3):
        kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel,
                  max_tokens=800, temperature=1.0, seed=seed)
        if stream:
            content, calls, finish = streamed(client(model_server).chat.completions.create(stream=True, **kw))
        else:
            r = client(model_server).chat.completions.create(**kw)
            (c,) = r.choices
            content, finish = c.message.content, c.finish_reason
            calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                     for t in c.message.tool_calls or []]
        assert finish == "tool_calls", (content, calls)
        assert not content
        check_calls(calls, names)
        if not parallel:
            assert len(calls) == 1


def test_tool_choice_none_and_auto_answer_with_text(model_server):
    for choice in ("none", "auto"):
        r = client(model_server).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                         max_tokens=12, temperature=0)
        (c,) = r.choices
        assert c.finish_reason in ("stop", "length") and c.message.tool_calls is None
        assert isinstance(c.message.content, str)


# -- auto and none over a scripted engine: what a model that calls tools writes ------------------------
class ScriptedEngine:
    """The server's engine interface, answering every request with `pieces` of text (as a
    model would stream them), recording the prompts it got."""

    alive, queue_depth, running = True, 0, 0
    adapters: dict = {}  # no LoRA adapters beside the base

    def __init__(self, tokenizer: TextTokenizer, pieces: list[str]):
        self.tokenizer, self.context, self.pieces = tokenizer, 1024, pieces
        # Weights the server's embeddings service is built over; generation never reads them.
        self.model = Transformer(ModelConfig(family="llama", n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                                             context=1024, vocab_size=tokenizer.vocab_size)).eval()
        self.prompts: list[str] = []
        self.grammars: list[str | None] = []

    def start(self):
        return self

    def stop(self) -> None:
        pass

    def stream(self, requests):
        engine = self

        class Stream:
            async def __aiter__(self):
                for r in requests:
                    engine.prompts.append(engine.tokenizer.decode(r.prompt))
                    engine.grammars.append(r.grammar)
                for i in range(len(requests)):
                    for k, piece in enumerate(engine.pieces):
                        last = k == len(engine.pieces) - 1
                        yield i, Event(text=piece, tokens=[TokenLogprob(1, 0.0, [])],
                                       finish_reason="stop" if last else None)

            def cancel(self):
                pass

        return Stream()


CALL_TEXT = ['Let me check', '.\n<tool', '_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit"',
             ': "C"}}\n</tool_call>\n<tool_call>\n{"name": "find_flight", "arguments": {"to": "NRT", "seats": 2}}',
             "\n</tool_", "call>\n"]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_hermes_tool_calls(long_tiny, stream):
    engine = ScriptedEngine(long_tiny[1], CALL_TEXT)
    with serve(engine) as s:
        kw = dict(model=MODEL, messages=ASK, tools=TOOLS)
        if stream:
            content, calls, finish = streamed(client(s).chat.completions.create(stream=True, **kw))
        else:
            (c,) = client(s).chat.completions.create(**kw).choices
            content, finish = c.message.content, c.finish_reason
            calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                     for t in c.message.tool_calls]
    assert engine.grammars == [None]  # auto: the model is free, its calls are parsed
    assert "get_weather" in engine.prompts[0] and "<tool_call>" in engine.prompts[0]  # the fallback system message
    assert content == "Let me check."
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "東京", "unit": "C"}), ("find_flight", {"to": "NRT", "seats": 2})]
    assert len({c["id"] for c in calls}) == 2


def test_auto_keeps_what_is_not_a_call_as_content(long_tiny):
    text = ['Use <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> or <tool', ' maybe']
    with serve(ScriptedEngine(long_tiny[1], text)) as s:
        (c,) = client(s).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices
    assert c.message.content == "".join(text) and c.message.tool_calls is None and c.finish_reason == "stop"


def test_none_leaves_tools_out_and_output_alone(long_tiny):
    engine = ScriptedEngine(long_tiny[1], CALL_TEXT)
    with serve(engine) as s:
        (c,) = client(s).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none").choices
    assert "get_weather" not in engine.prompts[0]
    assert c.message.content == "".join(CALL_TEXT) and c.message.tool_calls is None and c.finish_reason == "stop"


HISTORY = [
    {"role": "user", "content": "Weather in Lima?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Lima", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 19}'},
]


@pytest.mark.parametrize("template", [None, TOOLS_TEMPLATE])
def test_history_with_calls_and_results_reaches_the_prompt(long_tiny, template):
    tokenizer = long_tiny[1] if template is None else with_template(long_tiny[1], template)
    engine = ScriptedEngine(tokenizer, ["It is 19 degrees."])
    with serve(engine) as s:
        (c,) = client(s).chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS).choices
    assert c.message.content == "It is 19 degrees." and c.finish_reason == "stop"
    prompt = engine.prompts[0]
    call = prompt[prompt.index("<tool_call>\n{", prompt.index("Weather in Lima?")):]
    assert json.loads(call[len("<tool_call>\n"):call.index("\n</tool_call>")]) == {
        "name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}
    assert '{"temperature": 19}' in prompt
    if template is None:
        assert "<tool_response>\n{\"temperature\": 19}\n</tool_response>" in prompt
    else:
        assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>\n{")


def test_conversation_in_hf_shape():
    body = ChatRequest.model_validate({"model": MODEL, "messages": HISTORY, "tools": TOOLS})
    msgs = conversation(body.messages, plan_of(body), template_takes_tools=True)
    assert msgs[1]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}}]
    assert msgs[2] == {"role": "tool", "content": '{"temperature": 19}', "tool_call_id": "call_1"}
    assert isinstance(ChatMessage.model_validate(HISTORY[1]).tool_calls, list)


@pytest.mark.parametrize("body, param, message", [
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "tool_choice names the function 'launch', which is not in tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'; tool names must differ"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
     "tools: not a usable tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice 'required' and response_format both constrain the output; give one"),
])
def test_bad_tool_requests_are_400s(long_tiny, body, param, message):
    with serve(ScriptedEngine(long_tiny[1], ["x"])) as s:
        with pytest.raises(openai.BadRequestError) as info:
            client(s).chat.completions.create(model=MODEL, messages=ASK, **body)
    err = info.value.body
    assert err["param"] == param and err["message"].startswith(message), err
