"""A tiny model, and real uvicorn servers on free loopback ports, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import uvicorn

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine
from lmforge.model import Transformer
from lmforge.serve.app import create_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
MODEL = "tiny"
TEXT = ["To be, or not to be, that is the question.", "ROMEO: But soft, what light through yonder window breaks?",
        "The king is dead; long live the king!", "Now is the winter of our discontent. Héllo, 世界 ✓"] * 20


@pytest.fixture(scope="session")
def tiny():
    tokenizer = train_tokenizer(TEXT, vocab_size=420)
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=128,
                      vocab_size=tokenizer.vocab_size)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    return model.eval(), tokenizer


class Server:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="session")
def start_server(tiny) -> Iterator[Callable[..., Server]]:
    """Start a server with these settings (closed at the end of the session)."""
    servers: list[Server] = []

    def start(max_batch: int = 16, max_queue: int = 64, **settings) -> Server:
        model, tokenizer = tiny
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
