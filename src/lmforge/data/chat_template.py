"""Chat templates (Jinja, as in `tokenizer_config.json`), rendered in a sandbox with a budget.

A template comes with a downloaded model and is untrusted code. Jinja's immutable sandbox
refuses attribute access to Python internals and mutation of the inputs; on top of that,
every render has a budget (`TemplateBudget`), so that a template cannot hang or exhaust the
process that renders it (a server, a data-preparation run):

- time and steps: every loop iteration, call, filter, operator and attribute lookup is a
  step; past `max_steps` steps or `seconds` of rendering, the render stops;
- size: the output, every string made on the way and every captured block (macros,
  `{% set %}` blocks) hold at most `max_chars` characters, every list at most `max_items`
  items (filters such as `sort` or `unique` do Python work per item that no step counts).
  Operations whose result size follows from their arguments (`'A' * n`, `s + s`, `~`,
  `%` and `format` widths, `center`, `indent`, `replace`, `join`, `batch`, ...) are
  checked before they run, so that an oversized value is never built; the rest after.

Over budget raises `TemplateBudgetExceeded` (an `LmforgeError`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.data.tokenizer import TextTokenizer

LOOP_FILTER = "lmforge_counted_loop"  # wraps every `for` loop's iterable (added at compile time)
CONCAT_FILTER = "lmforge_sized_concat"  # replaces the `~` operator
MAX_INT_BITS = 100_000  # integers a template computes with (`**`, `*`)


@dataclass(frozen=True)
class TemplateBudget:
    seconds: float = 1.0
    max_chars: int = 4_000_000
    max_items: int = 100_000
    max_steps: int = 1_000_000


DEFAULT_BUDGET = TemplateBudget()


class TemplateBudgetExceeded(LmforgeError):
    """A render went over its budget."""


class _Meter:
    def __init__(self, budget: TemplateBudget):
        self.budget = budget
        self.steps = 0
        self.deadline = time.monotonic() + budget.seconds

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.budget.max_steps:
            raise TemplateBudgetExceeded(f"the chat template took more than {self.budget.max_steps} steps "
                                         "(loop iterations, calls, filters)")
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"the chat template took longer than {self.budget.seconds:g} s to render")

    def chars(self, n: int, what: str) -> None:
        if n > self.budget.max_chars:
            raise TemplateBudgetExceeded(f"the chat template would make {what} of {n} characters, more than "
                                         f"{self.budget.max_chars}")

    def items(self, n: int, what: str) -> None:
        if n > self.budget.max_items:
            raise TemplateBudgetExceeded(f"the chat template would make {what} of {n} items, more than "
                                         f"{self.budget.max_items}")

    def check(self, value: Any, what: str = "a value") -> None:
        if isinstance(value, (str, bytes)):
            self.chars(len(value), what)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            self.items(len(value), what)


_meter: ContextVar[_Meter | None] = ContextVar("lmforge_template_meter", default=None)


def _active() -> _Meter:
    meter = _meter.get()
    if meter is None:  # at compile time: Jinja then leaves the expression to run time (no folding)
        raise TemplateBudgetExceeded("template code runs only inside a budgeted render")
    return meter


def _is_text(value: Any) -> bool:
    return isinstance(value, (str, bytes))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (str, bytes, list, tuple))


# -- sizes known before an operation runs ------------------------------------------------------
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_NESTED_BRACE = re.compile(r"\{[^{}]*:[^{}]*\{")


def _ints(values) -> list[int]:
    return [abs(v) for v in values if isinstance(v, int)]


def _check_format(meter: _Meter, fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt % args` or `fmt.format(...)`: no width or precision above the size cap."""
    numbers: list[int] = []
    star = False
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            star |= n == "*"
            numbers += [int(n)] if n.isdigit() else []
    for spec in _BRACE_SPEC.findall(fmt):
        numbers += [int(n) for n in re.findall(r"\d+", spec)]
    if star or _NESTED_BRACE.search(fmt):  # widths taken from the arguments
        flat = list(args) + list(kwargs.values())
        flat += [x for a in flat if isinstance(a, (tuple, list)) for x in a]
        flat += [x for a in flat if isinstance(a, dict) for x in a.values()]
        numbers += _ints(flat)
    meter.chars(max(numbers, default=0), "a formatted field")


def _check_binop(meter: _Meter, op: str, left: Any, right: Any) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if _is_sequence(seq) and isinstance(n, int):
                (meter.chars if _is_text(seq) else meter.items)(len(seq) * max(n, 0), "a repeated sequence")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateBudgetExceeded(f"the chat template computes with integers of more than {MAX_INT_BITS} bits")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise TemplateBudgetExceeded(f"the chat template computes with integers of more than {MAX_INT_BITS} bits")
    elif op == "+":
        if _is_sequence(left) and _is_sequence(right):
            (meter.chars if _is_text(left) else meter.items)(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_format(meter, left, right if isinstance(right, tuple) else (right,),
                      right if isinstance(right, dict) else {})


def _replaced_size(s: str, old: str, new: str, count: int | None = None) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * len(new)


def _width(w: Any) -> int:
    return w if isinstance(w, int) else len(str(w))


# How many characters a filter or a string method may make, from its arguments (the filter's
# own parameter names, after any context argument), for those whose output can outgrow their
# input; and how many items, for the filters that make lists.
_FILTER_CHARS = {
    "center": lambda value, width=80: _width(width),
    "indent": lambda s, width=4, first=False, blank=False:
        len(str(s)) + (str(s).count("\n") + 1) * _width(width),
    "replace": lambda s, old, new, count=None: _replaced_size(str(s), str(old), str(new), count),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        len(str(s)) * (1 + len(wrapstring or "\n")),
    "urlize": lambda value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None:
        len(str(value)) * (2 + len(str(target or "")) + len(str(rel or ""))),
    "tojson": lambda value, indent=None: len(json.dumps(value, default=str)) * (1 + _width(indent or 0)),
}
_FILTER_ITEMS = {
    "batch": lambda value, linecount, fill_with=None: _width(linecount),
    "slice": lambda value, slices, fill_with=None: _width(slices),
}
_METHOD_CHARS = {
    "center": lambda s, width, fillchar=" ": _width(width),
    "ljust": lambda s, width, fillchar=" ": _width(width),
    "rjust": lambda s, width, fillchar=" ": _width(width),
    "zfill": lambda s, width: _width(width),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * _width(tabsize),
    "replace": lambda s, old, new, count=-1: len(s) + (s.count(old) if old else len(s) + 1) * len(new),
    "translate": lambda s, table, *rest: len(s) * max(
        [len(v) for v in table.values() if _is_text(v)] if isinstance(table, dict) else [1], default=1),
}


def _materialized_join(meter: _Meter, sep: Any, items: Any) -> list:
    items = list(items)
    meter.items(len(items), "a joined list")
    meter.chars(len(items) * len(str(sep)) + sum(len(x) for x in items if _is_text(x)), "a joined string")
    return items


# -- the environment ---------------------------------------------------------------------------
def _budgeted_filter(name: str, func):
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(func) is not None else 0  # the context Jinja passes first

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        meter = _active()
        meter.step()
        data = args[skip:]
        if name in _FILTER_CHARS:
            meter.chars(_FILTER_CHARS[name](*data, **kwargs), f"'{name}' output")
        elif name in _FILTER_ITEMS:
            meter.items(_FILTER_ITEMS[name](*data, **kwargs), f"'{name}' output")
        elif name == "format" and data:
            _check_format(meter, str(data[0]), tuple(data[1:]), kwargs)
        elif name == "join" and data:
            sep = data[1] if len(data) > 1 else kwargs.get("d", "")
            args = (*args[:skip], _materialized_join(meter, sep, data[0]), *data[1:])
        elif name == "sum" and data:
            start = data[2] if len(data) > 2 else kwargs.get("start", 0)
            if _is_sequence(start):  # each addition copies the sum so far
                items = list(data[0])
                total = len(start) + sum(len(x) for x in items if _is_sequence(x))
                meter.items(total, "a sum of sequences")
                meter.step(len(items) * total)
                args = (*args[:skip], items, *data[1:])
        result = func(*args, **kwargs)
        meter.check(result, f"'{name}' output")
        return result

    return wrapper


def _counted_test(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _active().step()
        return func(*args, **kwargs)

    return wrapper


def _counted_loop(iterable):
    meter = _active()

    def counted():
        for item in iterable:
            meter.step()
            yield item

    return counted()


def _sized_concat(parts):
    meter = _active()
    meter.step()
    strings = [str(p) for p in parts]
    meter.chars(sum(len(s) for s in strings), "a concatenation")
    return "".join(strings)


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            meter = _active()
            meter.step()
            _check_binop(meter, operator, left, right)
            result = super().call_binop(context, operator, left, right)
            meter.check(result)
            return result

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            meter = _active()
            meter.step()
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            owner = getattr(method, "__self__", None)
            name = getattr(method, "__name__", "")
            if isinstance(owner, (str, bytes)):
                if name in ("format", "format_map") and isinstance(owner, str):
                    _check_format(meter, owner, args, args[0] if name == "format_map" and args else kwargs)
                elif name == "join" and args:
                    args = (_materialized_join(meter, owner, args[0]), *args[1:])
                elif name in _METHOD_CHARS:
                    meter.chars(_METHOD_CHARS[name](owner, *args, **kwargs), f"'{name}' output")
            result = super().call(__context, __obj, *args, **kwargs)
            meter.check(result)
            return result

        def getattr(self, obj, attribute):
            _active().step()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _active().step()
            return super().getitem(obj, argument)

        def concat(self, parts):  # captured output: macros, `{% set %}` and `{% filter %}` blocks
            parts = list(parts)
            _active().chars(sum(len(p) for p in parts if isinstance(p, str)), "a captured block")
            return "".join(parts)

    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals.pop("lipsum", None)  # generates text in loops of its own, which no step counts
    env.filters = {name: _budgeted_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _counted_test(f) for name, f in env.tests.items()}
    env.filters[LOOP_FILTER] = _counted_loop
    env.filters[CONCAT_FILTER] = _sized_concat
    return env


def _budgeted(tree):
    """Every `for` loop's iterable counted item by item, every `~` sized before it joins."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    class Budgeted(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, LOOP_FILTER, [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), CONCAT_FILTER, [], [], None, None,
                                lineno=node.lineno)

    return Budgeted().visit(tree)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError

    env = _environment()
    try:
        return env.from_string(_budgeted(env.parse(template)))
    except TemplateError as e:
        raise LmforgeError(f"the chat template does not compile: {e}") from None
    except (RecursionError, MemoryError):
        raise LmforgeError("the chat template does not compile: it is nested too deeply or too large") from None


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                         budget: TemplateBudget = DEFAULT_BUDGET, **variables: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"message {i} needs a 'role' and a 'content'")
    compiled = _compile(template)
    meter = _Meter(budget)
    token = _meter.set(meter)
    try:
        parts: list[str] = []
        length = 0
        for part in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            length += len(part)
            meter.chars(length, "an output")
            meter.step()
            parts.append(part)
        return "".join(parts)
    except SecurityError as e:
        raise LmforgeError(f"the chat template tried something unsafe and was stopped: {e}") from None
    except TemplateError as e:
        raise LmforgeError(f"the chat template failed: {e}") from None
    except RecursionError:
        raise TemplateBudgetExceeded("the chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateBudgetExceeded("the chat template ran out of memory") from None
    except LmforgeError:
        raise
    except Exception as e:  # the template is code: whatever it raises (1/0, int('x')) is its own failure
        raise LmforgeError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _meter.reset(token)


def end_of_turn_ids(tokenizer: TextTokenizer) -> list[int]:
    """The special token that closes a message under the tokenizer's chat template (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Phi-3's `<|end|>`, Mistral's `</s>`...), as a list:
    generation stops on it. Read off the template itself: what follows an assistant message's
    content. A special token never shows in text decoded with special tokens skipped, so
    stopping must be on the id, not on a stop string. Empty when the template ends a message
    with ordinary text, or does not render."""
    marker = "LMFORGE_REPLY_MARKER"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}],
                                                 add_generation_prompt=False)
    except LmforgeError:
        return []
    if marker not in rendered:
        return []
    after = rendered.split(marker, 1)[1].lstrip()
    ids = tokenizer.encode(after)[:1] if after else []
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    return [i for i in ids if i in special]
