"""The OpenAI-compatible HTTP API over the continuous-batching engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize,
POST /detokenize, GET /health, GET /metrics, and the chat page at /. Every route but
/health and the page's static files needs `Authorization: Bearer KEY` when keys are set.
Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

`/v1/completions` with `echo` and `logprobs` returns every prompt token's logprob given
the tokens before it, which is what evaluation harnesses (lm-eval's local-completions)
need to score log-likelihoods through the server.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.data.chat_template import TemplateBudgetExceeded, end_of_turn_ids
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, EngineOverloaded, Event, TokenLogprob
from lmforge.infer.engine import Request as EngineRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.middleware import RequestContext
from lmforge.serve.prompt_size import max_bytes_per_token
from lmforge.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                    TokenizeRequest)
from lmforge.serve.security import RateLimiter
from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")
STATIC = files("lmforge.serve") / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}


# Proxies must pass tokens on as they come (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _finite(x: float) -> float:
    return x if x > -1e30 else -1e30  # JSON has no -inf


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


# What a chat template must render within its budget for the server to start with it.
SMOKE_CONVERSATION = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
                      {"role": "user", "content": "Tell me about Romeo."}]


def check_chat_template(tokenizer) -> None:
    """Refuse, at start, a chat template that goes over its render budget on a short
    conversation: every chat request would. (A template that refuses this conversation's
    shape, with raise_exception, is left to the requests: they get its message.)"""
    try:
        tokenizer.apply_chat_template(SMOKE_CONVERSATION, add_generation_prompt=True)
    except TemplateBudgetExceeded as e:
        raise LmforgeError(f"refusing the model's chat template: {e}, for a three-message conversation; "
                           "fix the chat_template in tokenizer_config.json (or chat_template.jinja)") from None
    except LmforgeError:
        pass


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    tokenizer, context = engine.tokenizer, engine.context
    check_chat_template(tokenizer)
    metrics = ServerMetrics(engine)
    request_limiter = RateLimiter(settings.requests_per_minute)
    token_limiter = RateLimiter(settings.tokens_per_minute)
    max_prompt_tokens = min(settings.max_prompt_tokens or context, context - 1)
    bytes_per_token = max_bytes_per_token(tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.state.settings = settings
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       allowed_hosts=settings.allowed_hosts, body_timeout=settings.body_timeout)

    # -- errors ----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if first.get("type") == "json_invalid":
            message, where = "the body is not valid JSON", ""
        elif first.get("type") == "lone_surrogate":
            message, where = first["msg"], first["ctx"]["where"]
        else:
            message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return error_response(400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        detail = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 400 and "parsing the body" in detail:
            detail = "the body is not valid UTF-8 JSON"
        return error_response(e.status_code, detail, type_, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("request %s failed", request.state.request_id, exc_info=e)
        return error_response(500, "internal error; the server logged it", "server_error")

    # -- auth and limits ---------------------------------------------------------------------------
    async def authenticate(request: Request) -> str:
        key_id = "anonymous"
        if settings.api_keys:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise APIError(401, "no API key: send `Authorization: Bearer YOUR_KEY`", "authentication_error",
                               code="invalid_api_key")
            found = settings.api_keys.identify(token.strip())
            if found is None:
                raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
            key_id = found
        request.state.key_id = key_id
        wait = request_limiter.take(key_id, 1)
        if wait:
            raise APIError(429, f"request rate limit reached ({settings.requests_per_minute:g}/min); "
                           f"retry in {wait:.0f} s", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait))})
        return key_id

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves "
                           f"'{settings.model_name}'", "not_found_error", "model", "model_not_found")

    # -- generation --------------------------------------------------------------------------------
    def too_long(what: str) -> APIError:
        return APIError(400, f"the prompt has {what}; this server takes at most {max_prompt_tokens} tokens "
                        f"(the model's context is {context})", param="prompt", code="context_length_exceeded")

    async def encode_prompts(prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt, tokenizing the texts in a worker thread (the tokenizer
        releases the GIL in a batch): a long prompt must not hold up the event loop."""
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            size = len(text.encode("utf-8"))
            if bytes_per_token and size > max_prompt_tokens * bytes_per_token:  # more tokens, for sure
                raise too_long(f"{size} bytes, more than {max_prompt_tokens} tokens can hold (one token of "
                               f"this tokenizer stands for at most {bytes_per_token} bytes)")
        encoded = iter(await run_in_threadpool(tokenizer.encode_batch, texts) if texts else [])
        out = []
        vocab = engine.model.config.vocab
        for prompt in prompts:
            ids = next(encoded) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(ids) > max_prompt_tokens:
                raise too_long(f"{len(ids)} tokens")
            if isinstance(prompt, list) and any(t >= vocab for t in ids):
                raise APIError(400, f"a token id in the prompt is outside the vocabulary [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    async def make_job(body: SamplingFields, prompts: list[str | list[int]], max_tokens: int | None,
                       logprobs: int | None, echo: bool, key_id: str) -> Job:
        if body.n > settings.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {settings.max_n}", param="n")
        if len(prompts) * body.n > settings.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than the {settings.max_choices} "
                           "completions one request may ask for", param="prompt")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > settings.max_stop:
            raise APIError(400, f"{len(stop)} stop strings; at most {settings.max_stop}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "a stop string is empty", param="stop")
        if logprobs is not None and logprobs > settings.max_logprobs:
            raise APIError(400, f"logprobs is {logprobs}; at most {settings.max_logprobs}", param="logprobs")
        if max_tokens is not None and max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}",
                           param="max_tokens")
        encoded = await encode_prompts(prompts)
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        requests = []
        for ids in encoded:
            room = context - len(ids)
            limit = room if max_tokens is None else min(max_tokens, room)
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % (2**63)
                params = SamplingParams(max_new_tokens=limit, temperature=body.temperature,
                                        top_k=max(body.top_k, 0), top_p=body.top_p,
                                        repetition_penalty=body.repetition_penalty, stop=stop, seed=seed)
                requests.append(EngineRequest(ids, params, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None))
        cost = sum(len(r.prompt) + r.params.max_new_tokens for r in requests)
        job = Job(encoded, texts, requests, body.n, [Choice() for _ in requests], cost)
        if settings.tokens_per_minute and cost > settings.tokens_per_minute:
            raise APIError(429, f"this request may use {cost} tokens, more than your limit of "
                           f"{settings.tokens_per_minute:g} per minute; lower max_tokens or n", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "60"})
        wait = token_limiter.take(key_id, cost)
        if wait:
            raise APIError(429, f"token rate limit reached ({settings.tokens_per_minute:g}/min); retry in {wait:.0f} s",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(int(wait))})
        return job

    def open_stream(job: Job, key_id: str):
        try:
            return engine.stream(job.requests)
        except LmforgeError as e:
            token_limiter.give_back(key_id, job.cost)  # nothing ran
            if isinstance(e, EngineOverloaded):
                raise APIError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e)) from None

    def settle(job: Job, key_id: str, request: Request) -> None:
        """Account for a finished (or abandoned) job: metrics, logs, unused reserved tokens."""
        metrics.prompt_tokens.inc(job.prompt_tokens)
        metrics.generation_tokens.inc(job.completion_tokens)
        token_limiter.give_back(key_id, job.cost - job.prompt_tokens * job.n - job.completion_tokens)
        request.state.usage = job.usage()

    def record(job: Job, i: int, ev: Event) -> None:
        c = job.choices[i]
        if ev.error:
            log.error("generation failed: %s", ev.error)
            raise APIError(500, "generation failed; the server logged it", "server_error")
        if ev.prompt is not None:
            c.prompt = ev.prompt
        if ev.tokens and job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            metrics.ttft.observe(job.first_token_at - job.started)
        c.text.append(ev.text)
        c.tokens.extend(ev.tokens)
        if ev.finish_reason is not None:
            c.finish_reason = "stop" if ev.finish_reason == "stop" else "length"

    async def collect(job: Job, request: Request, key_id: str) -> None:
        stream = open_stream(job, key_id)
        try:
            async for i, ev in stream:
                record(job, i, ev)
                if ev.tokens and await request.is_disconnected():
                    break
        finally:
            stream.cancel()
            settle(job, key_id, request)

    def sse(payload: Any) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def stream_events(job: Job, request: Request, key_id: str, chunks) -> AsyncIterator[str]:
        """Submit now (errors become plain HTTP errors), then yield SSE lines as events come."""
        stream = open_stream(job, key_id)

        async def gen() -> AsyncIterator[str]:
            try:
                async for i, ev in stream:
                    record(job, i, ev)
                    for payload in chunks(i, ev):
                        yield sse(payload)
                for payload in chunks(None, None):
                    yield sse(payload)
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
            finally:
                stream.cancel()
                settle(job, key_id, request)

        return gen()

    # -- completions -------------------------------------------------------------------------------
    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    def completion_logprobs(entries: list[tuple[TokenLogprob | None, int]], offset: int) -> dict[str, list]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e, tok in entries:
            s = token_text(tok)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if e is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            top = {token_text(t): _finite(lp) for t, lp in e.top}
            top.setdefault(s, _finite(e.logprob))  # the chosen token always has its logprob
            token_logprobs.append(_finite(e.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def completion_choice(job: Job, i: int, echo: bool, logprobs: int | None, new_tokens: list[TokenLogprob],
                          text: str, with_prompt: bool, offset: int = 0) -> dict[str, Any]:
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
            lp = completion_logprobs(entries, offset)
        return {"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": c.finish_reason}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key_id: str = Depends(authenticate)):
        check_model(body.model)
        p = body.prompt
        prompts: list[str | list[int]] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "the prompt list is empty", param="prompt")
        job = await make_job(body, prompts, body.max_tokens, body.logprobs, body.echo, key_id)
        rid = "cmpl-" + uuid.uuid4().hex
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": settings.model_name}
        if not body.stream:
            await collect(job, request, key_id)
            choices = [completion_choice(job, i, body.echo, body.logprobs, c.tokens, "".join(c.text), True)
                       for i, c in enumerate(job.choices)]
            return {**head, "choices": choices, "usage": job.usage()}

        offsets: dict[int, int] = {}  # per choice that has started: where its next token's text begins

        def chunks(i: int | None, ev: Event | None):
            if i is None:
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": job.usage()}
                return
            first = i not in offsets
            if not ev.tokens and ev.finish_reason is None and not (body.echo and first):
                return
            choice = completion_choice(job, i, body.echo, body.logprobs, ev.tokens, ev.text, first, offsets.get(i, 0))
            lp = choice["logprobs"]
            offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp and lp["tokens"] else offsets.get(i, 0)
            choice["finish_reason"] = job.choices[i].finish_reason if ev.finish_reason else None
            yield {**head, "choices": [choice]}

        return StreamingResponse(stream_events(job, request, key_id, chunks), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    # -- chat --------------------------------------------------------------------------------------
    turn_end = end_of_turn_ids(tokenizer)

    async def chat_prompt(messages) -> str:
        """The conversation rendered by the model's chat template, in a worker thread: the
        template's budget (chat_template.TemplateBudget) bounds how long that takes."""
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return await run_in_threadpool(tokenizer.apply_chat_template, conversation, True)
        except TemplateBudgetExceeded as e:
            raise APIError(400, f"{e} for these messages", param="messages", code="chat_template_budget") from None
        except LmforgeError as e:
            raise APIError(400, str(e), param="messages") from None

    def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, list]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = token_text(t)
            return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]}
                            for t in tokens]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, key_id: str = Depends(authenticate)):
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = await make_job(body, [await chat_prompt(body.messages)], max_tokens, logprobs, False, key_id)
        if turn_end:  # the template's end of turn is a special token, never seen as text
            for r in job.requests:
                r.stop_token_ids = list(turn_end)
        rid = "chatcmpl-" + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": settings.model_name}
        if not body.stream:
            await collect(job, request, key_id)
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": chat_logprobs(c.tokens) if logprobs is not None else None,
                        "finish_reason": c.finish_reason} for i, c in enumerate(job.choices)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}

        started: set[int] = set()
        head["object"] = "chat.completion.chunk"

        def chunks(i: int | None, ev: Event | None):
            if i is None:
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": job.usage()}
                return
            if i not in started:
                started.add(i)
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            if ev.text or (ev.tokens and logprobs is not None):
                yield {**head, "choices": [{"index": i, "delta": {"content": ev.text},
                                            "logprobs": chat_logprobs(ev.tokens) if logprobs is not None else None,
                                            "finish_reason": None}]}
            if ev.finish_reason is not None:
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": job.choices[i].finish_reason}]}

        return StreamingResponse(stream_events(job, request, key_id, chunks), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    # -- the rest ----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(key_id: str = Depends(authenticate)):
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": context}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, key_id: str = Depends(authenticate)):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either a prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else await chat_prompt(body.messages)
        (ids,) = await run_in_threadpool(tokenizer.encode_batch, [text])
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, key_id: str = Depends(authenticate)):
        check_model(body.model)
        vocab = tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"a token id is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(key_id: str = Depends(authenticate)):
        """vLLM's shape, which lm-eval's remote tokenizer backend reads."""
        cfg = tokenizer.config
        names = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items() if k.endswith("_token")}
        return {"eos_token": names.get("eos_token"), "bos_token": names.get("bos_token"),
                "pad_token": names.get("pad_token"), "chat_template": tokenizer.chat_template,
                "model_max_length": context, "vocab_size": tokenizer.vocab_size}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(key_id: str = Depends(authenticate)):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(key_id: str = Depends(authenticate)):
        return JSONResponse(app.openapi())

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(), headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        types = {"chat.js": "text/javascript", "chat.css": "text/css"}
        if name not in types:
            raise APIError(404, "not found", "not_found_error")
        return Response((STATIC / name).read_text(), media_type=types[name], headers=PAGE_HEADERS)

    return app
