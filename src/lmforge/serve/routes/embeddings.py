"""POST /v1/embeddings (services.embeddings)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmforge.serve.protocol import EmbeddingRequest, check_model
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.services.embeddings import EmbeddingService

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings)
    service: EmbeddingService = request.app.state.embeddings
    return await service.create(body, key_id)
