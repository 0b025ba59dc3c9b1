"""POST /v1/completions: prompts (texts or token ids) continued, with optional echo and
logprobs. With `echo` and `logprobs`, every prompt token's logprob given the tokens before
it comes back too, which is what evaluation harnesses (lm-eval's local-completions) need to
score log-likelihoods through the server."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request

from lmforge.infer.engine import Event, TokenLogprob
from lmforge.serve.logprobs import completion_logprobs
from lmforge.serve.protocol import CompletionRequest
from lmforge.serve.services.generation import GenerationService, Job
from lmforge.serve.structured import grammar_of


class CompletionService:
    def __init__(self, generation: GenerationService):
        self.generation = generation

    def choice(self, job: Job, i: int, echo: bool, logprobs: int | None, new_tokens: list[TokenLogprob],
               text: str, with_prompt: bool, offset: int = 0) -> dict[str, Any]:
        """Choice i with this text and these tokens (and the prompt before them, if echoed)."""
        c = job.choices[i]
        prompt_i = i // job.n
        prefix = job.prompt_texts[prompt_i] if echo and with_prompt else ""
        lp = None
        if logprobs is not None:
            entries: list[tuple[TokenLogprob | None, int]] = []
            if echo and with_prompt:
                prompt_entries = c.prompt or [None] * len(job.prompts[prompt_i])
                entries += list(zip(prompt_entries, job.prompts[prompt_i]))
            entries += [(t, t.token) for t in new_tokens]
            lp = completion_logprobs(entries, offset, self.generation.token_text)
        return {"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": c.finish_reason}

    async def create(self, body: CompletionRequest, request: Request,
                     key_id: str) -> dict[str, Any] | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE frames."""
        gen = self.generation
        job = await gen.job(body, body.prompt_list(), body.max_tokens, body.logprobs, body.echo, key_id,
                            await grammar_of(body))
        head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": gen.served_name(body.model)}
        if not body.stream:
            await gen.collect(job, request, key_id)
            choices = [self.choice(job, i, body.echo, body.logprobs, c.tokens, "".join(c.text), True)
                       for i, c in enumerate(job.choices)]
            return {**head, "choices": choices, "usage": job.usage()}

        offsets: dict[int, int] = {}  # per choice that has started: where its next token's text begins

        def chunks(i: int | None, ev: Event | None) -> Iterator[dict[str, Any]]:
            if i is None or ev is None:
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": job.usage()}
                return
            first = i not in offsets
            if not ev.tokens and ev.finish_reason is None and not (body.echo and first):
                return
            choice = self.choice(job, i, body.echo, body.logprobs, ev.tokens, ev.text, first, offsets.get(i, 0))
            lp = choice["logprobs"]
            offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp and lp["tokens"] else offsets.get(i, 0)
            choice["finish_reason"] = job.choices[i].finish_reason if ev.finish_reason else None
            yield {**head, "choices": [choice]}

        return gen.stream(job, request, key_id, chunks)
