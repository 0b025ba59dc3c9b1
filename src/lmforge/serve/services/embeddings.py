"""POST /v1/embeddings: the served model's pooled, L2-normalised hidden states (train/embed.py),
in OpenAI's shape: floats or base64 (little-endian float32), `dimensions` where the model
allows truncation, usage in tokens.

What the model's directory says decides the pooling: `embedding.json` (written by
`lmforge finetune --task embed`) beside the adapter or the model, else mean pooling.
Inputs are checked against the server's limits (at most max_embedding_inputs of them, each
within max_prompt_tokens), charged to the key's token rate limit, then embedded in a worker
thread, batched by length. The model runs one such batch at a time (`ModelTurn`), beside
the engine's decoding, on a `shared_copy` of its model.
"""

from __future__ import annotations

import base64
import copy
import itertools
import threading
from pathlib import Path
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from lmforge.serve.errors import APIError
from lmforge.serve.prompts import PromptEncoder
from lmforge.serve.protocol import EmbeddingRequest, listed_inputs
from lmforge.serve.security import RateLimiter
from lmforge.serve.settings import ServeSettings
from lmforge.train.embed import Embedder, embedding_record


def record_folder(folders: list[Path], name: str) -> Path | None:
    """The last of the served directories (the model's, then an adapter's) that holds file `name`."""
    found = [f for f in folders if (Path(f) / name).is_file()]
    return Path(found[-1]) if found else None


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's module tree with hooks of its own, sharing every parameter and buffer (no
    weights copied): the engine adds LoRA updates with forward hooks on its model while it
    decodes adapter rows, which a forward pass running beside it must not pick up."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class ModelTurn:
    """The model's forward passes outside the engine, one batch at a time, in worker threads."""

    def __init__(self):
        self.lock = threading.Lock()

    async def run(self, fn, *args):
        def locked():
            with self.lock, torch.no_grad():
                return fn(*args)

        return await run_in_threadpool(locked)


class TokenCharge:
    """A request's input tokens, taken from its key's token rate limit (as generation's are)."""

    def __init__(self, limiter: RateLimiter, settings: ServeSettings):
        self.limiter, self.settings = limiter, settings

    def __call__(self, key_id: str, tokens: int) -> None:
        per_minute = self.settings.tokens_per_minute
        if per_minute and tokens > per_minute:
            raise APIError(429, f"this request has {tokens} tokens, more than your limit of {per_minute:g} per "
                           "minute; send fewer inputs", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "60"})
        wait = self.limiter.take(key_id, tokens)
        if wait:
            raise APIError(429, f"token rate limit reached ({per_minute:g}/min); retry in {wait:.0f} s",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(int(wait))})


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class EmbeddingService:
    def __init__(self, embedder: Embedder, prompts: PromptEncoder, settings: ServeSettings, charge: TokenCharge,
                 turn: ModelTurn):
        self.embedder, self.prompts, self.settings, self.charge, self.turn = embedder, prompts, settings, charge, turn

    @classmethod
    def for_model(cls, model, tokenizer, folders: list[Path], prompts: PromptEncoder, settings: ServeSettings,
                  charge: TokenCharge, turn: ModelTurn) -> "EmbeddingService":
        record = embedding_record(record_folder(folders, "embedding.json"))
        embedder = Embedder(model, tokenizer, record.get("pooling", "mean"), record.get("dimensions"))
        return cls(embedder, prompts, settings, charge, turn)

    async def create(self, body: EmbeddingRequest, key_id: str) -> dict[str, Any]:
        inputs = listed_inputs(body.input, self.settings.max_embedding_inputs)
        allowed = self.embedder.dimensions
        if body.dimensions is not None and body.dimensions not in allowed:
            raise APIError(400, f"dimensions {body.dimensions} is not offered: this model's embeddings may be "
                           f"{' or '.join(map(str, allowed))} long (shorter ones only when trained with "
                           "embed.matryoshka)", param="dimensions")
        rows = await self.prompts.encode(inputs, what="input")
        tokens = sum(map(len, rows))
        self.charge(key_id, tokens)
        vectors = await self.turn.run(self.embedder.embed_ids, rows, self.settings.max_batch, body.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.settings.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
