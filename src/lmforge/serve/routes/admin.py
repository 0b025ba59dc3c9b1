"""The server itself: GET /v1/models, /health (no key needed), /metrics (Prometheus) and
/openapi.json (the request bodies' schemas, behind the key like the API)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmforge.serve.engine_api import ServingEngine
from lmforge.serve.errors import error_response
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.settings import ServeSettings

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request, key_id: str = Depends(authenticate)):
    settings: ServeSettings = request.app.state.settings
    engine: ServingEngine = request.app.state.engine
    return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                        "created": request.app.state.created, "owned_by": "lmforge",
                                        "max_model_len": engine.context}]}


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
