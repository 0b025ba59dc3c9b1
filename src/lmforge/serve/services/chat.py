"""POST /v1/chat/completions: a conversation rendered by the model's chat template and
answered; a reply ends at the template's end-of-turn token. With tools, the reply's tool
calls are parsed out of it (serve.tools); with a response_format, it follows a grammar."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request

from lmforge.data.chat_template import end_of_turn_ids
from lmforge.infer.engine import Event
from lmforge.serve.logprobs import chat_logprobs
from lmforge.serve.protocol import ChatRequest
from lmforge.serve.services.generation import GenerationService
from lmforge.serve.structured import checked, grammar_of
from lmforge.serve.tools import ParsedCall, ToolPlan, conversation, format_of, plan_of, takes_tools, tool_dict


class ChatService:
    def __init__(self, generation: GenerationService):
        self.generation = generation
        # The template's end of turn is a special token, never seen as text.
        self.turn_end = end_of_turn_ids(generation.engine.tokenizer)
        self.template_takes_tools = takes_tools(generation.engine.tokenizer.chat_template)
        self.tool_format = format_of(generation.engine.tokenizer.chat_template)  # Hermes, Llama 3.1 or Mistral

    async def prompt_and_grammar(self, body: ChatRequest, plan: ToolPlan) -> tuple[str, str | None]:
        """The rendered conversation (with the tools, when they are on) and the grammar its
        answer must follow, if any."""
        takes = self.template_takes_tools
        variables = {"tools": [tool_dict(t) for t in plan.tools]} if plan.active and takes else {}
        prompt = await self.generation.prompts.render_conversation(conversation(body.messages, plan, takes), True,
                                                                   **variables)
        if plan.active:
            calls = await checked(self.tool_format.grammar(plan), "tools")  # a bad parameter schema is a 400 in every mode
            if plan.forced:
                return prompt, calls
        return prompt, await grammar_of(body)

    async def create(self, body: ChatRequest, request: Request, key_id: str) -> dict[str, Any] | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE frames."""
        gen = self.generation
        logprobs = body.logprob_alternatives()
        plan = plan_of(body)
        prompt, grammar = await self.prompt_and_grammar(body, plan)
        job = await gen.job(body, [prompt], body.token_limit(), logprobs, False, key_id, grammar)
        if self.turn_end:
            for r in job.requests:
                r.stop_token_ids = list(self.turn_end)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": gen.served_name(body.model)}

        def logprobs_of(tokens) -> dict[str, list] | None:
            return chat_logprobs(tokens, gen.token_text) if logprobs is not None else None

        def finish_reason(i: int, calls: bool) -> str | None:
            reason = job.choices[i].finish_reason
            return "tool_calls" if calls and reason == "stop" else reason

        if not body.stream:
            await gen.collect(job, request, key_id)
            choices = []
            for i, c in enumerate(job.choices):
                text = "".join(c.text)
                message: dict[str, Any] = {"role": "assistant", "content": text}
                calls: list[ParsedCall] = []
                if plan.active:
                    parser = self.tool_format.parser(plan)
                    parts = parser.feed(text) + parser.finish()
                    calls = parser.calls
                    message["content"] = "".join(p for p in parts if isinstance(p, str)) or (None if calls else "")
                    if calls:
                        message["tool_calls"] = [call.message() for call in calls]
                choices.append({"index": i, "message": message, "logprobs": logprobs_of(c.tokens),
                                "finish_reason": finish_reason(i, bool(calls))})
            return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}

        started: set[int] = set()
        parsers = {i: self.tool_format.parser(plan) for i in range(len(job.choices))} if plan.active else {}
        head["object"] = "chat.completion.chunk"

        def delta(i: int, d: dict[str, Any], lp: dict[str, list] | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": None}]}

        def chunks(i: int | None, ev: Event | None) -> Iterator[dict[str, Any]]:
            if i is None or ev is None:
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": job.usage()}
                return
            if i not in started:
                started.add(i)
                yield delta(i, {"role": "assistant", "content": ""})
            lp = logprobs_of(ev.tokens) if ev.tokens else None
            if i in parsers:
                parser = parsers[i]
                parts = parser.feed(ev.text) + (parser.finish() if ev.finish_reason is not None else [])
                for part in parts:
                    if isinstance(part, str):
                        yield delta(i, {"content": part}, lp)
                    else:
                        yield delta(i, {"tool_calls": [{"index": parser.calls.index(part), **part.message()}]}, lp)
                    lp = None
                if lp is not None:
                    yield delta(i, {"content": ""}, lp)
            elif ev.text or lp is not None:
                yield delta(i, {"content": ev.text}, lp)
            if ev.finish_reason is not None:
                calls = bool(parsers[i].calls) if i in parsers else False
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": finish_reason(i, calls)}]}

        return gen.stream(job, request, key_id, chunks)
