"""Multi-turn GRPO environments: a rollout is a tool-use transcript.

With `grpo.environment` set, each sample is an episode of up to `max_turns` model turns. The
model writes a turn; if the turn holds a tool call in the Hermes format that `lmforge serve`
parses (`infer.tool_calls.CallParser`, the server's parser),

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    </tool_call>

the turn is cut after the call, the environment function runs it, and its result is appended
as a tool message (`<tool_response>` text; for chat prompts inside a user turn of the chat
template, as `serve.tools.conversation` writes tool results for a template without tools); the model
then continues. An episode ends at a turn without a call, after max_turns, or when the context
is full.

    grpo:
      environment:
        function: calculator              # a built-in, or module:function / file.py:function
        tools: [calculator]               # the names a call may use
        max_turns: 3

An environment function is `env(name, arguments, **fields) -> str` (`fields`: the prompt line's
other keys); what it raises is returned to the model as `error: ...` text, as a tool would.
Rewards get the transcript: `reward(prompt, completion, transcript=[...], **fields)`, with
`completion` the last model turn's text and `transcript` the messages (assistant turns with
their `tool_calls`, tool turns with `name` and `content`). Only the model's own tokens are
trained on: the tool turns' tokens are context with IGNORE targets, so they add nothing to the
loss or its gradient.
"""

from __future__ import annotations

import ast
import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.sft import IGNORE, Row
from lmforge.errors import LmforgeError
from lmforge.infer.tool_calls import CLOSE, CallParser, ParsedCall, response_block

Environment = Callable[..., str]


# ----------------------------------------------------------------------------- the calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # 9**9**9 would run for hours
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


def calculator(name: str, arguments: dict[str, Any], **fields: Any) -> str:
    """Arithmetic on numbers: `{"expression": "17 * (3 + 4)"}` -> "119". Nothing else is evaluated."""
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ValueError("calculator takes {\"expression\": \"<arithmetic>\"}")
    value = _evaluate(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


ENVIRONMENTS: dict[str, Environment] = {"calculator": calculator}


def load_environment(reference: str) -> Environment:
    """A built-in environment's name, or a function as rewards name theirs."""
    from lmforge.train.rewards import load_function

    return ENVIRONMENTS.get(reference) or load_function(reference)


# ----------------------------------------------------------------------------- episodes

@dataclass
class Episode:
    """One sample's transcript as token ids: `ids` the whole sequence (prompt, model turns, tool
    turns), `own` per id whether the model sampled it."""

    ids: list[int]
    own: list[bool]
    transcript: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def completion(self) -> str:
        """The last model turn's text (what single-turn rewards read)."""
        return next((m["content"] for m in reversed(self.transcript) if m["role"] == "assistant"), "")

    @property
    def model_tokens(self) -> int:
        return sum(self.own)

    def row(self) -> Row:
        """Next-token training row: the model's tokens are targets, the prompt's and the tools' IGNORE."""
        targets = [t if own else IGNORE for t, own in zip(self.ids, self.own)]
        return Row(self.ids[:-1], targets[1:], [1] * (len(self.ids) - 1))


def cut_after_call(tokenizer, tokens: list[int]) -> list[int]:
    """The tokens up to the one that completes the first `</tool_call>` (all of them if none does)."""
    if CLOSE not in tokenizer.decode(tokens):
        return tokens
    for k in range(1, len(tokens) + 1):
        if CLOSE in tokenizer.decode(tokens[:k]):
            return tokens[:k]
    return tokens


def parse_turn(text: str, names: set[str]) -> tuple[str, list[ParsedCall]]:
    """(the turn's content, its calls), as `lmforge serve` reads a reply."""
    parser = CallParser(names)
    parts = parser.feed(text) + parser.finish()
    return "".join(p for p in parts if isinstance(p, str)), parser.calls


class ToolEnvironment:
    """Runs episodes for GrpoTask: `generate(prompt ids, params) -> engine Results` is the policy."""

    def __init__(self, settings, tokenizer, context: int):
        self.settings, self.tokenizer, self.context = settings, tokenizer, context
        self.function = load_environment(settings.function)
        self.names = set(settings.tools)

    def run(self, generate, prompts: list[Any], prompt_ids: list[list[int]], fields: list[dict[str, Any]],
            params: list) -> list[Episode]:
        """Every sample's episode, the turns of all live episodes decoded together."""
        episodes = [Episode(list(ids), [False] * len(ids)) for ids in prompt_ids]
        for turn in range(self.settings.max_turns):
            live = [i for i, e in enumerate(episodes) if not e.done]
            if not live:
                break
            turn_params = [params[i].model_copy(update={
                "seed": None if params[i].seed is None else params[i].seed + 7919 * turn,
                "stop": [CLOSE],
                "max_new_tokens": min(params[i].max_new_tokens, self.context - len(episodes[i].ids))})
                for i in live]
            results = generate([list(episodes[i].ids) for i in live], turn_params)
            for i, result in zip(live, results):
                self._turn(episodes[i], prompts[i], fields[i], [t.token for t in result.tokens],
                           last=turn == self.settings.max_turns - 1)
        return episodes

    def _turn(self, episode: Episode, prompt: Any, fields: dict[str, Any], tokens: list[int], last: bool) -> None:
        tokens = cut_after_call(self.tokenizer, tokens)
        episode.ids += tokens
        episode.own += [True] * len(tokens)
        content, calls = parse_turn(self.tokenizer.decode(tokens, skip_special=True), self.names)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.message() for c in calls]
        episode.transcript.append(message)
        if not calls or last:
            episode.done = True
            return
        results = [self._call(c, fields) for c in calls]
        for call, result in zip(calls, results):
            episode.transcript.append({"role": "tool", "name": call.name, "tool_call_id": call.id, "content": result})
        added = self.tokenizer.encode(self._tool_text(prompt, episode, results))
        if len(episode.ids) + len(added) + 1 >= self.context:  # no room for another turn
            episode.done = True
            return
        episode.ids += added
        episode.own += [False] * len(added)

    def _call(self, call: ParsedCall, fields: dict[str, Any]) -> str:
        try:
            result = self.function(call.name, json.loads(call.arguments), **fields)
        except LmforgeError:
            raise
        except Exception as e:  # the model sees the error, as a tool's caller would
            return f"error: {type(e).__name__}: {e}"
        if not isinstance(result, str):
            raise LmforgeError(f"environment {self.settings.function} returned {type(result).__name__}; "
                               "it must return the tool's output as text")
        return result

    def _tool_text(self, prompt: Any, episode: Episode, results: list[str]) -> str:
        """The text between the model's call and its next turn: the tool responses, in the chat
        template's user turn for chat prompts."""
        responses = "\n".join(response_block(r) for r in results)
        if not isinstance(prompt, list):
            return "\n" + responses + "\n"
        turn = self.tokenizer.decode(episode.ids[self._turn_start(episode):], skip_special=True)
        history = prompt + [{"role": "assistant", "content": turn}]
        tool_messages = [{"role": "user", "content": response_block(r)} for r in results]
        before = self.tokenizer.apply_chat_template(history, add_generation_prompt=False)
        after = self.tokenizer.apply_chat_template(history + tool_messages, add_generation_prompt=True)
        at = before.rfind(turn)
        end = at + len(turn) if turn and at >= 0 else len(os.path.commonprefix([before, after]))
        return after[end:]  # the model wrote the turn up to `end` itself

    @staticmethod
    def _turn_start(episode: Episode) -> int:
        """Where the model's latest turn begins in the episode's ids."""
        k = len(episode.own)
        while k > 0 and episode.own[k - 1]:
            k -= 1
        return k
