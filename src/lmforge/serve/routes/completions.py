"""POST /v1/completions (services.completions)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmforge.serve import sse
from lmforge.serve.protocol import CompletionRequest, check_model
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.services.completions import CompletionService

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings, request.app.state.adapters.names())
    service: CompletionService = request.app.state.completions
    result = await service.create(body, request, key_id)
    return result if isinstance(result, dict) else sse.event_stream(result)
