"""What an operator sets for a server: limits, keys, CORS. Defaults are the safe ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.serve.security import ApiKeys


@dataclass
class ServeSettings:
    model_name: str
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    requests_per_minute: float | None = None  # per key; None: no limit
    tokens_per_minute: float | None = None  # per key, prompt + completion tokens reserved up front
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 4096  # cap on a request's max_tokens
    max_n: int = 8
    max_choices: int = 64  # prompts x n in one request
    max_stop: int = 4
    max_logprobs: int = 20
    cors_origins: list[str] = field(default_factory=list)  # empty: no cross-origin access at all
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 256  # requests waiting beyond that, then 503
    native_decode: bool = True  # decoding steps run through lmforge.infer.native_decode
