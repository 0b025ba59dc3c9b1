"""POST /v1/chat/completions: a conversation rendered by the model's chat template and
answered; a reply ends at the template's end-of-turn token."""

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


class ChatService:
    def __init__(self, generation: GenerationService):
        self.generation = generation
        # The template's end of turn is a special token, never seen as text.
        self.turn_end = end_of_turn_ids(generation.engine.tokenizer)

    async def create(self, body: ChatRequest, request: Request, key_id: str) -> dict[str, Any] | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE frames."""
        gen = self.generation
        logprobs = body.logprob_alternatives()
        prompt = await gen.prompts.render_chat(body.messages)
        job = await gen.job(body, [prompt], body.token_limit(), logprobs, False, key_id)
        if self.turn_end:
            for r in job.requests:
                r.stop_token_ids = list(self.turn_end)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": gen.settings.model_name}

        def logprobs_of(tokens) -> dict[str, list] | None:
            return chat_logprobs(tokens, gen.token_text) if logprobs is not None else None

        if not body.stream:
            await gen.collect(job, request, key_id)
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": logprobs_of(c.tokens), "finish_reason": c.finish_reason}
                       for i, c in enumerate(job.choices)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}

        started: set[int] = set()
        head["object"] = "chat.completion.chunk"

        def chunks(i: int | None, ev: Event | None) -> Iterator[dict[str, Any]]:
            if i is None or ev is None:
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": job.usage()}
                return
            if i not in started:
                started.add(i)
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            if ev.text or (ev.tokens and logprobs is not None):
                yield {**head, "choices": [{"index": i, "delta": {"content": ev.text},
                                            "logprobs": logprobs_of(ev.tokens), "finish_reason": None}]}
            if ev.finish_reason is not None:
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": job.choices[i].finish_reason}]}

        return gen.stream(job, request, key_id, chunks)
