"""What the server needs of an engine, and nothing more: its tokenizer and context, its life
cycle, its load (for /health and the metrics), and streams of events for batches of
requests. infer.engine.Engine is one; a test can stand in for it with another."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from lmforge.data.tokenizer import TextTokenizer
from lmforge.infer.engine import Event, Request


class EventStream(Protocol):
    """(index of the request, event) pairs until every request finished; `cancel` stops what still runs."""

    def __aiter__(self) -> AsyncIterator[tuple[int, Event]]: ...

    def cancel(self) -> None: ...


class ServingEngine(Protocol):
    tokenizer: TextTokenizer
    context: int

    def start(self) -> object: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def stream(self, requests: list[Request]) -> EventStream:
        """Submit the requests together (all or none); raises EngineOverloaded when they do not
        fit the queue, LmforgeError for a request the engine cannot run."""
        ...
