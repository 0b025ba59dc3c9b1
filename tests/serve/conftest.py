"""Fixtures for the HTTP tests: a tiny model, and servers started with given settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from serve_helpers import KEY, MODEL, OTHER_KEY, Server, tiny_model

from lmforge.infer.engine import Engine
from lmforge.serve.app import create_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def start_server(tiny) -> Iterator[Callable[..., Server]]:
    """Start a server with these settings (closed at the end of the session)."""
    servers: list[Server] = []

    def start(max_batch: int = 16, max_queue: int = 64, tokenizer=None, **settings) -> Server:
        model, tokenizer = tiny[0], tokenizer or tiny[1]
        settings.setdefault("api_keys", ApiKeys([KEY, OTHER_KEY]))
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        server = Server(create_app(engine, ServeSettings(model_name=MODEL, **settings))).__enter__()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    return start_server()


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c
