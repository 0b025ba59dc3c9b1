"""Llama 3.1 and Mistral tool-call formats (serve.tools.format_of) through the official `openai`
client: the chat template decides the format; forced calls (grammar) always parse, auto
calls are parsed from what a model in that family writes (a scripted engine), streaming and
not; tool results go back the family's way (Llama's ipython role, Mistral's [TOOL_RESULTS]
with 9-character call ids)."""

from __future__ import annotations

import json
import re

import openai
import pytest
from serve_helpers import tiny_model
from test_tools import ASK, MODEL, SCHEMAS, TOOLS, ScriptedEngine, check_calls, client, serve, streamed, with_template

from lmforge.infer.engine import Engine
from lmforge.serve.tools import HERMES, LLAMA3, MISTRAL, LlamaParser, MistralParser, format_of

# The shape of Llama 3.1's template: tools in a system turn, calls as JSON after <|python_tag|>,
# results in the ipython role.
LLAMA_TEMPLATE = (
    "<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Respond with a JSON object {\"name\": function name, \"parameters\": dictionary of arguments}.\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' or m.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>"
    "{% elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n{% for c in m.tool_calls %}"
    "<|python_tag|>{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}{% endfor %}"
    "<|eom_id|>"
    "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# The shape of Mistral's v3 template: [AVAILABLE_TOOLS], [TOOL_CALLS] with 9-character ids,
# [TOOL_RESULTS] naming the call.
MISTRAL_TEMPLATE = (
    "<s>{% if tools %}[AVAILABLE_TOOLS] [{% for t in tools %}{{ t | tojson }}{% if not loop.last %}, {% endif %}"
    "{% endfor %}][/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {\"content\": {{ m.content | tojson }}, "
    "\"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{% elif m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    "{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{{ {'name': c.function.name, 'arguments': c.function.arguments, 'id': c.id} | tojson }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}]</s>"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}")

@pytest.fixture(scope="module")
def long_tiny():
    """A random tiny model with room for the tools' descriptions in its context."""
    return tiny_model(context=2048)


TEMPLATES = {"llama3": LLAMA_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
NINE = re.compile(r"[A-Za-z0-9]{9}")


def test_format_follows_the_template():
    assert format_of(LLAMA_TEMPLATE) is LLAMA3 and format_of(MISTRAL_TEMPLATE) is MISTRAL
    assert format_of(None) is HERMES and format_of("{{ messages }}") is HERMES
    # A template that does not take tools gets Hermes' format through the system message.
    assert format_of("[TOOL_CALLS] {% for m in messages %}{{ m.content }}{% endfor %}") is HERMES


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def family_server(request, long_tiny):
    model, tokenizer = long_tiny
    with serve(Engine(model, with_template(tokenizer, TEMPLATES[request.param]))) as s:
        yield request.param, s


def scripted(long_tiny, family: str, pieces: list[str]) -> ScriptedEngine:
    return ScriptedEngine(with_template(long_tiny[1], TEMPLATES[family]), pieces)


def ask(server, stream: bool, **kw) -> tuple[str | None, list[dict], str]:
    if stream:
        return streamed(client(server).chat.completions.create(model=MODEL, stream=True, **kw))
    (c,) = client(server).chat.completions.create(model=MODEL, **kw).choices
    calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
             for t in c.message.tool_calls or []]
    return c.message.content, calls, c.finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice, parallel", [("required", True), ("get_weather", False)])
def test_forced_calls_parse_in_each_format(family_server, choice, parallel, stream):
    family, server = family_server
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    for seed in range(2):
        content, calls, finish = ask(server, stream, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                     parallel_tool_calls=parallel, max_tokens=800, temperature=1.0, seed=seed)
        assert finish == "tool_calls" and not content, (content, calls)
        check_calls(calls, set(SCHEMAS) if choice == "required" else {choice})
        assert parallel or len(calls) == 1
        if family == "mistral":
            assert all(NINE.fullmatch(c["id"]) for c in calls)


LLAMA_TEXT = ['<|python', '_tag|>{"name": "get_weather", "parameters": {"city": "東京", "unit": "C"}}; ',
              '{"name": "find_flight", "parameters": {"to": "NRT", "seats": 2}}']
MISTRAL_TEXT = ['Checking both.', ' [TOOL', '_CALLS] [{"name": "get_weather", "arguments": {"city": "東京", ',
                '"unit": "C"}}, {"name": "find_flight", "arguments": {"to": "NRT", "seats": 2}}]']
EXPECTED = [("get_weather", {"city": "東京", "unit": "C"}), ("find_flight", {"to": "NRT", "seats": 2})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("family, pieces, content", [
    ("llama3", LLAMA_TEXT, None),
    ("llama3", ['\n{"name": "get_weather", "parameters": {"city": "東京", "unit": "C"}}',  # tag decoded away
                '; {"name": "find_flight", "parameters": {"to": "NRT", "seats": 2}}'], None),
    ("mistral", MISTRAL_TEXT, "Checking both."),
    ("mistral", [' [{"name": "get_weather", "arguments": {"city": "東京", "unit": "C"}}, ',  # marker decoded away
                 '{"name": "find_flight", "arguments": {"to": "NRT", "seats": 2}}]'], None),
])
def test_auto_parses_each_format(long_tiny, family, pieces, content, stream):
    engine = scripted(long_tiny, family, pieces)
    with serve(engine) as s:
        got, calls, finish = ask(s, stream, messages=ASK, tools=TOOLS)
    assert engine.grammars == [None]
    assert (got or None) == content and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == EXPECTED
    if family == "mistral":
        assert all(NINE.fullmatch(c["id"]) for c in calls)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("family, pieces", [
    ("llama3", ['{"name": "rm_rf", "parameters": {}}']),  # not one of the tools
    ("llama3", ["Tokyo is ", "{sunny} today."]),
    ("mistral", ["[1] Tokyo ", "is sunny."]),
    ("mistral", ['Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": "Lima"}]']),  # arguments not an object
])
def test_auto_keeps_what_is_not_a_call_as_content(long_tiny, family, pieces, stream):
    with serve(scripted(long_tiny, family, pieces)) as s:
        content, calls, finish = ask(s, stream, messages=ASK, tools=TOOLS)
    assert content == "".join(pieces) and not calls and finish == "stop"


def test_results_go_back_the_familys_way(long_tiny):
    history = [{"role": "user", "content": "Weather in Lima?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "a1B2c3D4e", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Lima", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": '{"temperature": 19}'}]
    llama = scripted(long_tiny, "llama3", ["It is 19 degrees."])
    with serve(llama) as s:
        assert ask(s, False, messages=history, tools=TOOLS)[0] == "It is 19 degrees."
    assert ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima", "unit": "C"}}<|eom_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 19}<|eot_id|>') in llama.prompts[0]
    mistral = scripted(long_tiny, "mistral", ["It is 19 degrees."])
    with serve(mistral) as s:
        assert ask(s, False, messages=history, tools=TOOLS)[0] == "It is 19 degrees."
        bad = [history[0], {**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "id": "call_1"}]}]
        with pytest.raises(openai.BadRequestError) as info:
            ask(s, False, messages=bad, tools=TOOLS)
    assert "length 9" in info.value.body["message"]
    prompt = mistral.prompts[0]
    calls = prompt[prompt.index("[TOOL_CALLS] ") + len("[TOOL_CALLS] "):prompt.index("</s>[TOOL_RESULTS]")]
    assert json.loads(calls) == [{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}, "id": "a1B2c3D4e"}]
    assert prompt.endswith('[TOOL_RESULTS] {"content": "{\\"temperature\\": 19}", "call_id": "a1B2c3D4e"}[/TOOL_RESULTS]')
    assert prompt.startswith("<s>[AVAILABLE_TOOLS] [{") and "get_weather" in prompt[:prompt.index("[/AVAILABLE_TOOLS]")]


def test_forced_grammars_are_the_familys_json(long_tiny):
    """What the grammar lets a forced reply be: Llama's objects with `parameters`, Mistral's array."""
    for family, parser, text in [
        ("llama3", LlamaParser, '{"name": "find_flight", "parameters": {"to": "LIM", "seats": 1}}'),
        ("mistral", MistralParser, '[{"name": "find_flight", "arguments": {"to": "LIM", "seats": 1}}]'),
    ]:
        engine = scripted(long_tiny, family, [text])
        with serve(engine) as s:
            content, calls, finish = ask(s, False, messages=ASK, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "find_flight"}})
        (grammar,) = engine.grammars
        assert ("parameters" in grammar) == (family == "llama3") and "find_flight" in grammar
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("find_flight", {"to": "LIM", "seats": 1})]
        assert finish == "tool_calls" and not content and parser is not None
