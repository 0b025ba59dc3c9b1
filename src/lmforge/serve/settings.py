"""What an operator sets for a server: limits, keys, CORS, hosts, timeouts. Defaults are the safe ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
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
    max_embedding_inputs: int = 2048  # inputs in one /v1/embeddings, /v1/classify or /v1/tag request
    cors_origins: list[str] = field(default_factory=list)  # empty: no cross-origin access at all
    allowed_hosts: list[str] = field(default_factory=list)  # empty: on loopback, loopback names only
    header_timeout: float = 10.0  # seconds for a request's headers to arrive whole
    body_timeout: float = 30.0  # seconds for its body
    keep_alive_timeout: float = 5.0  # seconds an idle connection is kept between requests
    max_connections: int = 512  # open connections; more are answered 503
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 256  # requests waiting beyond that, then 503
    native_decode: bool = True  # decoding steps run through lmforge.infer.native_decode
    prefix_cache_mb: float = 256.0  # keys and values of shared prompt prefixes (infer.prefix_cache); 0: off
    speculative: str | None = None  # "ngram": prompt-lookup drafts (infer.speculative)
    speculative_tokens: int = 5  # drafts checked per step
    draft: str | None = None  # a draft model directory

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise LmforgeError(f"--{name.replace('_', '-')} must be more than 0 seconds")
        if self.max_connections < 1:
            raise LmforgeError("--max-connections must be at least 1")
        if self.max_embedding_inputs < 1:
            raise LmforgeError("--max-embedding-inputs must be at least 1")
        if not self.prefix_cache_mb >= 0:
            raise LmforgeError("--prefix-cache-mb must be 0 or more (or give --no-prefix-cache)")
        if self.speculative not in (None, "ngram"):
            raise LmforgeError(f"--speculative {self.speculative!r} is not known: give 'ngram' (prompt lookup), "
                               "or --draft MODEL for a draft model")
        if self.speculative and self.draft:
            raise LmforgeError("give --speculative ngram or --draft MODEL, not both")
        if self.speculative_tokens < 1:
            raise LmforgeError("--speculative-tokens must be at least 1")
