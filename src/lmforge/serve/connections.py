"""The connection layer under the app: uvicorn's h11 protocol, with the limits it lacks.

uvicorn closes a keep-alive connection that stays idle between requests
(`keep_alive_timeout`), but it waits for a request's headers without end and accepts any
number of connections, so a client that opens connections and never finishes a request
head holds them forever. Here:

- a request head (request line and headers) must arrive whole within `header_timeout`
  seconds: of the connection's opening for its first request, of the first byte of the
  next one on a kept-alive connection. Past that the connection is closed (with a 408 if
  part of a head came);
- beyond `max_connections` open connections, a new one is answered 503 and closed (after
  reading, for up to a second, what it still sends: closing a socket with unread data resets
  it, and the client would see the reset rather than the 503);
- a request head larger than h11's 16 KiB is answered 400 (uvicorn's own check).

The body's deadline (`body_timeout`) is the app's (middleware.RequestContext), which can
answer it in the API's error shape.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.serve.errors import error_body
from lmforge.serve.settings import ServeSettings


def raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for when no request is parsed."""
    body = error_body(message, code)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


LINGER_SECONDS = 1.0


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refused = True
            transport.write(raw_response(503, "Service Unavailable", f"the server has {self.max_connections} "
                                         "connections open, its limit; retry shortly", "too_many_connections"))
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, transport.close)
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, until the client or the linger timer closes
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Time a request head from when one is awaited (and no keep-alive timer runs: between
        requests, uvicorn's idle timeout applies until a byte comes) until it is whole."""
        awaiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not awaiting:
            self._stop_head_timer()
        elif self._head_timer is None and self.timeout_keep_alive_task is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection closes
            self.transport.write(raw_response(408, "Request Timeout", "the request headers did not arrive within "
                                              f"{self.header_timeout:g} s", "request_timeout"))
        self.transport.close()


def uvicorn_config(app, settings: ServeSettings, **options) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` with the connection limits of `settings`."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": settings.header_timeout, "max_connections": settings.max_connections})
    options.setdefault("access_log", False)  # the app logs each request itself (middleware.py)
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
                          server_header=False, **options)
