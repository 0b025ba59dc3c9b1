"""The budgeted chat-template renderer: templates in the styles models ship render exactly as
Jinja's own sandbox renders them, and templates that would hang or exhaust the process stop
within their budget."""

from __future__ import annotations

import time

import pytest

from lmforge.data.chat_template import TemplateBudget, TemplateBudgetExceeded, render_chat_template
from lmforge.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from lmforge.errors import LmforgeError

# Written for these tests in the manner of common model templates: a system prompt pulled
# out with a namespace, loop.first/last, tojson with indent, selectattr, string methods,
# slicing, `~` and `+`, %-formatting and str.format, macros, raise_exception.
TOOL_STYLE = """\
{%- set ns = namespace(system='', found=false) -%}
{%- for m in messages if m.role == 'system' -%}{%- set ns.system = m.content | trim -%}{%- endfor -%}
{{ bos_token }}<|start|>system
{{ ns.system if ns.system else 'You are a helpful assistant.' }}
{%- if tools is defined %}
Tools:
{{ tools | tojson(indent=4) }}
{%- endif %}<|end|>
{% for m in messages | rejectattr('role', 'equalto', 'system') %}
{%- if loop.first and m.role != 'user' %}{{ raise_exception('the first turn must be the user\\'s') }}{% endif -%}
<|start|>{{ m.role }}
{{ m.content.split('</think>')[-1].strip() if m.role == 'assistant' else m.content }}<|end|>
{% endfor -%}
{%- if add_generation_prompt %}<|start|>assistant
{% endif -%}"""

MACRO_STYLE = """\
{%- macro turn(role, text) -%}[{{ role | upper }}] {{ text ~ '' }}{{ '\\n' }}{%- endmacro -%}
{%- for m in messages -%}
{%- if m.content is string -%}{{ turn(m.role, m.content) }}{%- endif -%}
{%- if loop.last and m.role == 'user' %}{{ '(%d messages, %s)' % (messages | length, m.role) }}{% endif -%}
{%- endfor -%}
{{ '{0} | {1:>6}'.format(eos_token, 'end') }}
{%- for m in messages[::-1][:2] %}{{ m.role[:1] + (loop.index | string) }}{% endfor -%}
{{ messages | map(attribute='content') | map('length') | sum }}
{{ messages | selectattr('role', 'in', ['user', 'assistant']) | map(attribute='role') | unique | sort | join(',') }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Who is Romeo?"},
     {"role": "assistant", "content": "<think>hmm</think> A Montague."}, {"role": "user", "content": "世界 ✓ é"}],
    [{"role": "user", "content": "x" * 2000}, {"role": "assistant", "content": ""}, {"role": "user", "content": "%s {}"}],
]


def plain_jinja(template: str, messages, **variables) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        from jinja2 import TemplateError

        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **variables)


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, TOOL_STYLE, MACRO_STYLE], ids=["chatml", "tool", "macro"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system-think", "long"])
def test_templates_render_as_jinja_renders_them(template, messages):
    variables = {"add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}
    tools = [{"name": "search", "parameters": {"q": {"type": "string"}}}]
    ours = render_chat_template(template, messages, tools=tools, **variables)
    assert ours == plain_jinja(template, messages, tools=tools, **variables)
    assert ours  # and they made something


def test_a_template_refusing_a_conversation_says_so():
    with pytest.raises(LmforgeError, match="the first turn must be the user's"):
        render_chat_template(TOOL_STYLE, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(LmforgeError, match="ZeroDivisionError"):
        render_chat_template("{{ 1 / 0 }}", CONVERSATIONS[0])


HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repeat": "{{ 'A' * 3000000000 }}",
    "repeat a list": "{{ [0] * 3000000000 }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "tilde doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "center": "{{ 'x' | center(3000000000) }}",
    "ljust": "{{ 'x'.ljust(3000000000) }}",
    "percent width": "{{ '%3000000000s' % 'x' }}",
    "percent star": "{{ '%*d' % (3000000000, 1) }}",
    "format filter": "{{ '%.3000000000f' | format(1.5) }}",
    "str.format": "{{ '{:>3000000000}'.format('x') }}",
    "nested str.format": "{{ '{:{}}'.format('x', 3000000000) }}",
    "power": "{{ 9 ** (9 ** 9) }}",
    "replace": "{% set s = 'a' * 100000 %}{{ s | replace('a', s) }}",
    "join": "{% set s = 'a' * 100000 %}{{ s | join(s) }}",
    "str.join": "{% set s = 'a' * 100000 %}{{ s.join(s) }}",
    "indent": "{{ ('a\\n' * 1000000) | indent(1000) }}",
    "batch": "{{ [1] | batch(3000000000, 0) | list }}",
    "sum of lists": "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
    "captured block": "{% set a = 'A' * 4000000 %}{% set x %}{% for i in range(100) %}{{ a }}{% endfor %}{% endset %}",
    "macro output": "{% macro m() %}{% for i in range(100) %}{{ 'A' * 4000000 }}{% endfor %}{% endmacro %}{{ m() }}",
    "output": "{% for i in range(100) %}{{ 'A' * 4000000 }}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "tojson indent": "{{ messages | tojson(indent=3000000000) }}",
    "quadratic in content": "{% for a in messages[0].content %}{% for b in messages[0].content %}"
                            "{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_stop_within_the_budget(template):
    started = time.perf_counter()
    with pytest.raises(TemplateBudgetExceeded):
        render_chat_template(template, [{"role": "user", "content": "x" * 5000}])
    assert time.perf_counter() - started < 3


def test_the_deadline_stops_work_no_step_limit_catches():
    """Each iteration upper-cases 4 MB (milliseconds, one step): the clock stops it."""
    template = "{% for i in range(100000) %}{{ ('a' * 4000000) | upper | length }}{% endfor %}"
    started = time.perf_counter()
    with pytest.raises(TemplateBudgetExceeded, match="longer than 0.3 s"):
        render_chat_template(template, CONVERSATIONS[0], budget=TemplateBudget(seconds=0.3))
    assert time.perf_counter() - started < 1.5


def test_budget_limits_are_exact():
    budget = TemplateBudget(max_chars=100, max_items=10, max_steps=50)
    assert render_chat_template("{{ 'a' * 100 }}", CONVERSATIONS[0], budget=budget) == "a" * 100
    with pytest.raises(TemplateBudgetExceeded, match="101 characters, more than 100"):
        render_chat_template("{{ 'a' * 101 }}", CONVERSATIONS[0], budget=budget)
    with pytest.raises(TemplateBudgetExceeded, match="11 items, more than 10"):
        render_chat_template("{{ [0] * 11 }}", CONVERSATIONS[0], budget=budget)
    with pytest.raises(TemplateBudgetExceeded, match="more than 50 steps"):
        render_chat_template("{% for i in range(60) %}{% endfor %}", CONVERSATIONS[0], budget=budget)
    with pytest.raises(TemplateBudgetExceeded, match="an output of 101 characters"):  # the message itself
        render_chat_template("{{ messages[0].content }}", [{"role": "user", "content": "a" * 101}], budget=budget)
