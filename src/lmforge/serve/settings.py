"""What an operator sets for a server: limits, keys, CORS, hosts, timeouts. Defaults are the safe ones.

Field names are the `lmforge serve` flags' (`header_timeout` is `--header-timeout`) except where
`FLAGS` says otherwise, so `config.from_flags` names the flag a problem came from."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lmforge.config import Section
from lmforge.serve.security import ApiKeys

FLAGS = {"model_name": "served-model-name", "cors_origins": "cors-origin", "native_decode": "reference-path"}


class ServeSettings(Section):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str
    api_keys: ApiKeys = Field(default_factory=lambda: ApiKeys([]))
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
    cors_origins: list[str] = []  # empty: no cross-origin access at all
    allowed_hosts: list[str] = []  # empty: on loopback, loopback names only
    header_timeout: float = 10.0  # seconds for a request's headers to arrive whole
    body_timeout: float = 30.0  # seconds for its body
    keep_alive_timeout: float = 5.0  # seconds an idle connection is kept between requests
    max_connections: int = 512  # open connections; more are answered 503
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 256  # requests waiting beyond that, then 503
    native_decode: bool = True  # decoding steps run through lmforge.infer.native_decode
    prefill_chunk: int = Field(512, ge=0)  # long prompts prefilled this many tokens at a time (infer.chunked_prefill); 0: whole
    kv_cache_dtype: Literal["auto", "int8"] = "auto"  # "int8": the batch slots' keys and values (infer.slots.Int8SlotCache)
    prefix_cache_mb: float = 256.0  # keys and values of shared prompt prefixes (infer.prefix_cache); 0: off
    speculative: str | None = None  # "ngram": prompt-lookup drafts (infer.speculative)
    speculative_tokens: int = 5  # drafts checked per step
    draft: str | None = None  # a draft model directory

    @field_validator("header_timeout", "body_timeout", "keep_alive_timeout")
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be more than 0 seconds")
        return value

    @field_validator("max_connections", "speculative_tokens", "max_embedding_inputs")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("prefix_cache_mb")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError("must be 0 or more (or give --no-prefix-cache)")
        return value

    @field_validator("speculative")
    @classmethod
    def _known_drafter(cls, value: str | None) -> str | None:
        if value not in (None, "ngram"):
            raise ValueError(f"{value!r} is not known: give 'ngram' (prompt lookup), "
                             "or --draft MODEL for a draft model")
        return value

    @model_validator(mode="after")
    def _one_drafter(self) -> "ServeSettings":
        if self.speculative and self.draft:
            raise ValueError("give --speculative ngram or --draft MODEL, not both")
        if (self.speculative or self.draft) and self.kv_cache_dtype != "auto":
            raise ValueError(f"drafts are checked by the native decoder, which reads fp32 caches: give --speculative "
                             f"or --draft without --kv-cache-dtype {self.kv_cache_dtype}")
        return self
