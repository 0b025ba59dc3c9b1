"""The server itself: GET /v1/models, /health (no key needed), /metrics (Prometheus),
/openapi.json (the request bodies' schemas, behind the key like the API), and loading and
unloading LoRA adapters at run time (POST /admin/adapters, DELETE /admin/adapters/NAME)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from lmforge.errors import LmforgeError
from lmforge.serve.adapters_registry import AdapterError, AdapterRegistry
from lmforge.serve.engine_api import ServingEngine
from lmforge.serve.errors import APIError, error_response
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.protocol import RequestBody
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.settings import ServeSettings

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request, key_id: str = Depends(authenticate)):
    settings: ServeSettings = request.app.state.settings
    engine: ServingEngine = request.app.state.engine
    adapters: AdapterRegistry = request.app.state.adapters
    base = {"id": settings.model_name, "object": "model", "created": request.app.state.created,
            "owned_by": "lmforge", "max_model_len": engine.context}
    return {"object": "list", "data": [base, *({**base, "id": name, "parent": settings.model_name}
                                               for name in adapters.names())]}


class AdapterLoad(RequestBody):
    name: str = Field(max_length=64, description="The name requests will send as `model`")
    path: str = Field(max_length=4096, description="The adapter directory, under the server's --adapter-root")


@router.post("/admin/adapters")
async def load_adapter(body: AdapterLoad, request: Request, key_id: str = Depends(authenticate)):
    """Load a LoRA adapter (PEFT layout, safetensors) from under --adapter-root; requests may
    name it as soon as this returns."""
    adapters: AdapterRegistry = request.app.state.adapters
    try:
        path = adapters.checked_path(body.path)
        adapter = await asyncio.to_thread(adapters.read, body.name, path)  # reading is file I/O and arithmetic
        adapters.add(adapter, path)
    except AdapterError as e:
        kind = {403: "permission_error", 409: "conflict_error"}.get(e.status, "invalid_request_error")
        raise APIError(e.status, str(e), kind, "name" if e.status == 409 else "path") from None
    except LmforgeError as e:  # the adapter does not fit the base model, or its files are wrong
        raise APIError(400, str(e), param="path") from None
    return {"id": adapter.name, "object": "model", "parent": request.app.state.settings.model_name,
            "rank": adapter.rank, "bytes": adapter.nbytes}


@router.delete("/admin/adapters/{name}")
async def unload_adapter(name: str, request: Request, key_id: str = Depends(authenticate)):
    """Unload an adapter: new requests naming it get 404 at once; the answer comes once the
    requests already decoding with it have finished (with it)."""
    adapters: AdapterRegistry = request.app.state.adapters
    try:
        adapter = adapters.unload(name)
    except AdapterError as e:
        raise APIError(e.status, str(e), "not_found_error", "name", "model_not_found") from None
    waited = adapter.users
    while adapter.users > 0:
        await asyncio.sleep(0.02)
    return {"id": name, "object": "model", "deleted": True, "waited_for_requests": waited}


@router.get("/health")
async def health(request: Request):
    engine: ServingEngine = request.app.state.engine
    if not engine.alive:
        return error_response(503, "the engine is not running", "server_error")
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request, key_id: str = Depends(authenticate)):
    metrics: ServerMetrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, key_id: str = Depends(authenticate)):
    return JSONResponse(request.app.openapi())
