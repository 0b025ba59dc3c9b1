"""Prometheus metrics of one server, on its own registry (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmforge.serve.engine_api import ServingEngine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, engine: ServingEngine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from request to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        Gauge("lmforge_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("lmforge_running_requests", "Sequences in the running batch", registry=r).set_function(
            lambda: engine.running)
        cache = getattr(engine, "prefix_cache", None)  # None: the prefix cache is off
        if cache is not None:
            Gauge("lmforge_prefix_cache_hit_rate", "Share of prompt tokens whose keys and values came from the "
                  "prefix cache", registry=r).set_function(lambda: cache.stats.hit_rate)
            Gauge("lmforge_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                  registry=r).set_function(lambda: cache.stats.hit_tokens)
            Gauge("lmforge_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache",
                  registry=r).set_function(lambda: cache.stats.prompt_tokens)
            Gauge("lmforge_prefix_cache_bytes", "Memory the prefix cache holds", registry=r).set_function(
                lambda: cache.used_bytes)
        spec = getattr(engine, "speculator", None)  # None: no speculative decoding
        if spec is not None:
            Gauge("lmforge_speculative_acceptance_rate", "Share of draft tokens the model kept",
                  registry=r).set_function(lambda: spec.stats.acceptance_rate)
            Gauge("lmforge_speculative_draft_tokens", "Draft tokens checked", registry=r).set_function(
                lambda: spec.stats.proposed)
