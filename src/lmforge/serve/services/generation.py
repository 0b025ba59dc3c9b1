"""Generation shared by the completions and chat APIs: a request's prompts become engine
requests (prompts x n), reserved against the key's token rate limit, run, and accounted for.

Each HTTP request's sequences run in one engine stream: an event with an error fails that
request alone (500, or an error frame once streaming), and a client that goes away cancels
its sequences. Whatever ends a job, `settle` counts its tokens, gives back the tokens it
reserved and did not use, and leaves its usage on the request for the access log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from lmforge.errors import LmforgeError
from lmforge.infer.engine import EngineOverloaded, Event, TokenLogprob
from lmforge.infer.engine import Request as EngineRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.serve import sse
from lmforge.serve.engine_api import EventStream, ServingEngine
from lmforge.serve.errors import APIError
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.prompts import PromptEncoder
from lmforge.serve.protocol import SamplingFields, check_limits
from lmforge.serve.security import RateLimiter
from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")

# The payloads to send for one event (index, event), and those to end with (None, None).
Chunks = Callable[[int | None, Event | None], Iterable[dict[str, Any]]]


@dataclass
class Choice:
    """One generated sequence as it accumulates."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


@dataclass
class Job:
    """A request's prompts (encoded), its engine requests (prompts x n) and what they made."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    requests: list[EngineRequest]
    n: int
    choices: list[Choice] = field(default_factory=list)
    cost: int = 0  # tokens reserved against the key's rate limit
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class GenerationService:
    def __init__(self, engine: ServingEngine, settings: ServeSettings, prompts: PromptEncoder,
                 metrics: ServerMetrics, adapter_of: Callable[[str | None], str | None] = lambda model: None):
        self.engine, self.settings, self.prompts, self.metrics = engine, settings, prompts, metrics
        self.adapter_of = adapter_of  # a request's `model` -> the LoRA adapter it names, or None (the base)
        self.token_limiter = RateLimiter(settings.tokens_per_minute)

    def served_name(self, model: str | None) -> str:
        """What a response's `model` says: the adapter the request named, else the base model."""
        return self.adapter_of(model) or self.settings.model_name

    def token_text(self, token: int) -> str:
        return self.engine.tokenizer.decode([token])

    async def job(self, body: SamplingFields, prompts: list[str | list[int]], max_tokens: int | None,
                  logprobs: int | None, echo: bool, key_id: str, grammar: str | None = None) -> Job:
        """The engine requests for these prompts, their tokens reserved (or a 4xx); with a
        grammar (serve.structured), every output follows it."""
        settings = self.settings
        stop = check_limits(body, len(prompts), max_tokens, logprobs, settings)
        encoded = await self.prompts.encode(prompts)
        texts = [self.prompts.text(p) for p in prompts]
        requests = []
        adapter = self.adapter_of(body.model)
        for ids in encoded:
            room = self.engine.context - len(ids)
            limit = room if max_tokens is None else min(max_tokens, room)
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % (2**63)
                # The protocol layer checked these fields within SamplingParams' bounds (a 400 names
                # the request's own field), so they are not checked again per choice.
                params = SamplingParams.model_construct(
                    max_new_tokens=limit, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                    repetition_penalty=body.repetition_penalty, stop=stop, seed=seed)
                requests.append(EngineRequest(ids, params, logprobs=logprobs,
                                              prompt_logprobs=echo and logprobs is not None, grammar=grammar,
                                              adapter=adapter))
        cost = sum(len(r.prompt) + r.params.max_new_tokens for r in requests)
        job = Job(encoded, texts, requests, body.n, [Choice() for _ in requests], cost)
        if settings.tokens_per_minute and cost > settings.tokens_per_minute:
            raise APIError(429, f"this request may use {cost} tokens, more than your limit of "
                           f"{settings.tokens_per_minute:g} per minute; lower max_tokens or n", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "60"})
        wait = self.token_limiter.take(key_id, cost)
        if wait:
            raise APIError(429, f"token rate limit reached ({settings.tokens_per_minute:g}/min); retry in {wait:.0f} s",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(int(wait))})
        return job

    def open_stream(self, job: Job, key_id: str) -> EventStream:
        try:
            return self.engine.stream(job.requests)
        except LmforgeError as e:
            self.token_limiter.give_back(key_id, job.cost)  # nothing ran
            if isinstance(e, EngineOverloaded):
                raise APIError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e)) from None

    def settle(self, job: Job, key_id: str, request: Request) -> None:
        """Account for a finished (or abandoned) job: metrics, logs, unused reserved tokens."""
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self.metrics.generation_tokens.inc(job.completion_tokens)
        self.token_limiter.give_back(key_id, job.cost - job.prompt_tokens * job.n - job.completion_tokens)
        request.state.usage = job.usage()

    def record(self, job: Job, i: int, ev: Event) -> None:
        c = job.choices[i]
        if ev.error:
            log.error("generation failed: %s", ev.error)
            raise APIError(500, "generation failed; the server logged it", "server_error")
        if ev.prompt is not None:
            c.prompt = ev.prompt
        if ev.tokens and job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(job.first_token_at - job.started)
        c.text.append(ev.text)
        c.tokens.extend(ev.tokens)
        if ev.finish_reason is not None:
            c.finish_reason = "stop" if ev.finish_reason == "stop" else "length"

    async def collect(self, job: Job, request: Request, key_id: str) -> None:
        """Run the job to its end (or until the client goes away)."""
        stream = self.open_stream(job, key_id)
        try:
            async for i, ev in stream:
                self.record(job, i, ev)
                if ev.tokens and await request.is_disconnected():
                    break
        finally:
            stream.cancel()
            self.settle(job, key_id, request)

    def stream(self, job: Job, request: Request, key_id: str, chunks: Chunks) -> AsyncIterator[str]:
        """Submit now (errors become plain HTTP errors), then yield SSE frames as events come."""
        stream = self.open_stream(job, key_id)

        async def frames() -> AsyncIterator[str]:
            try:
                async for i, ev in stream:
                    self.record(job, i, ev)
                    for payload in chunks(i, ev):
                        yield sse.frame(payload)
                for payload in chunks(None, None):
                    yield sse.frame(payload)
                yield sse.DONE
            except APIError as e:
                yield sse.error_frame(e)
            finally:
                stream.cancel()
                self.settle(job, key_id, request)

        return frames()
