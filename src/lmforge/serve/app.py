"""The OpenAI-compatible HTTP API over the continuous-batching engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings,
POST /v1/classify and /v1/tag (a fine-tuned task head's), POST /tokenize, POST /detokenize,
GET /tokenizer_info, GET /health, GET /metrics, and the chat page at /.
Every route but /health and the page's static files needs `Authorization: Bearer KEY` when
keys are set. Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

The layers, top to bottom: `create_app` wires them; `routes/` holds a router per API area
whose handlers check the request (protocol.py) and call a service; `services/` turns requests
into engine work and shapes the answers (logprobs.py, sse.py, errors.py); the engine sits
behind `engine_api.ServingEngine`. The middleware (middleware.py) and the connection layer
(connections.py) run under all of it.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lmforge.infer.engine import Engine
from lmforge.serve.adapters_registry import AdapterRegistry
from lmforge.serve.errors import install_error_handlers
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.middleware import RequestContext
from lmforge.serve.prompts import PromptEncoder, check_chat_template
from lmforge.serve.routes import ROUTERS
from lmforge.serve.security import RateLimiter
from lmforge.serve.services.chat import ChatService
from lmforge.serve.services.completions import CompletionService
from lmforge.serve.services.embeddings import EmbeddingService, ModelTurn, TokenCharge, shared_copy
from lmforge.serve.services.generation import GenerationService
from lmforge.serve.services.heads import HeadService, load_served_head
from lmforge.serve.services.tokens import TokenService
from lmforge.serve.settings import ServeSettings


@asynccontextmanager
async def lifespan(app: FastAPI):
    engine = app.state.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()


def create_app(engine: Engine, settings: ServeSettings, folders: list[Path] = ()) -> FastAPI:
    """The app serving `engine` under `settings`; the engine runs while the app does. `folders`:
    the directories the served weights came from (the model's, then an adapter's), whose
    embedding.json and task head the embeddings and head routes use."""
    tokenizer = engine.tokenizer
    check_chat_template(tokenizer)
    metrics = ServerMetrics(engine)
    prompts = PromptEncoder(tokenizer, engine.context, engine.model.config.vocab, settings.max_prompt_tokens)
    adapters = AdapterRegistry(engine, settings.model_name)  # build_app and POST /admin/adapters load into it
    generation = GenerationService(engine, settings, prompts, metrics, adapters.resolve)

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       allowed_hosts=settings.allowed_hosts, body_timeout=settings.body_timeout)
    install_error_handlers(app)

    state = app.state
    state.settings, state.engine, state.metrics, state.created = settings, engine, metrics, int(time.time())
    state.request_limiter = RateLimiter(settings.requests_per_minute)
    state.adapters = adapters
    state.completions = CompletionService(generation)
    state.chat = ChatService(generation)
    state.tokens = TokenService(tokenizer, engine.context, prompts)
    charge, turn, folders = TokenCharge(generation.token_limiter, settings), ModelTurn(), [Path(f) for f in folders]
    model = shared_copy(engine.model)  # the weights, without the hooks the engine adds while it decodes
    state.embeddings = EmbeddingService.for_model(model, tokenizer, folders, prompts, settings, charge, turn)
    state.heads = HeadService(load_served_head(model, tokenizer, folders), prompts, settings, charge, turn)
    for router in ROUTERS:
        app.include_router(router)
    return app
