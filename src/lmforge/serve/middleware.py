"""Per-request plumbing as plain ASGI: a request id, the Host check, the body-size cap and
read deadline, metrics and one JSON access-log line per request.

The body is read here, up to the cap, before any route sees it, so an oversized body is
refused with 413 however it is sent (with or without Content-Length), and a body that does
not arrive within `body_timeout` seconds gets 408. A Host header that `host_allowed`
refuses gets 400 before anything else. The log line holds the request id, route, status,
timing, the key's id and token counts: never a key, a header or a prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from lmforge.serve.errors import error_body
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.security import host_allowed

access_log = logging.getLogger("lmforge.serve.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics", "/openapi.json", "/"}


class RequestContext:
    def __init__(self, app, max_body_bytes: int, metrics: ServerMetrics, allowed_hosts: list[str],
                 body_timeout: float):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.allowed_hosts, self.body_timeout = allowed_hosts, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode()),
                                      (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
            await send(message)

        try:
            host = headers.get(b"host")
            local = scope.get("server")
            if not host_allowed(host.decode("latin-1") if host is not None else None, local[0] if local else None,
                                self.allowed_hosts):
                await self._refuse(send_with_id, 400, "the Host header names no host this server answers for; "
                                   "a server on loopback answers loopback names (localhost, 127.0.0.1, [::1]) "
                                   "and those given by --allowed-hosts", "invalid_host")
                return
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self._read_body(headers, receive)
            except TimeoutError:
                await self._refuse(send_with_id, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                   "request_timeout")
                return
            if body is None:
                await self._refuse(send_with_id, 413, f"the body is larger than {self.max_body_bytes} bytes")
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_id)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            usage = state.get("usage") or {}
            client = scope.get("client")
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": request_id, "method": scope["method"],
                "path": route, "status": status, "ms": round(elapsed * 1000, 1),
                "key": state.get("key_id"), "client": client[0] if client else None,
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            }))

    async def _read_body(self, headers, receive) -> bytes | None:
        """The whole body, or None when it is over the cap. An oversized body of moderate size
        is read to its end and dropped, so that the client can read the 413 (a server that
        closes on unread data makes the client see a connection reset instead)."""
        drain_limit = 16 * self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > drain_limit:
                    return None
            except ValueError:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            elif size > drain_limit:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks) if size <= self.max_body_bytes else None

    async def _refuse(self, send, status: int, message: str, code: str | None = None) -> None:
        body = error_body(message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
