"""POST /v1/chat/completions (services.chat)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmforge.serve import sse
from lmforge.serve.protocol import ChatRequest, check_model
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.services.chat import ChatService

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings, request.app.state.adapters.names())
    service: ChatService = request.app.state.chat
    result = await service.create(body, request, key_id)
    return result if isinstance(result, dict) else sse.event_stream(result)
