"""Constants, the tiny model, and a real uvicorn server on a free loopback port, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.serve.connections import uvicorn_config

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
MODEL = "tiny"
TEXT = ["To be, or not to be, that is the question.", "ROMEO: But soft, what light through yonder window breaks?",
        "The king is dead; long live the king!", "Now is the winter of our discontent. Héllo, 世界 ✓"] * 20


def free_port() -> int:
    """A loopback port free now, for a server started in another process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, log_level="warning"))
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


def tiny_model(context: int = 128):
    """(a random 2-layer llama, its 420-token tokenizer), seeded."""
    tokenizer = train_tokenizer(TEXT, vocab_size=420)
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=context,
                      vocab_size=tokenizer.vocab_size)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    return model.eval(), tokenizer
