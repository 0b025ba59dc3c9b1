"""POST /v1/classify and POST /v1/tag, lmforge's routes for fine-tuned task heads (services.heads)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmforge.serve.protocol import ClassifyRequest, TagRequest, check_model
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.services.heads import HeadService

router = APIRouter()


def heads(request: Request) -> HeadService:
    return request.app.state.heads


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings)
    return await heads(request).classify(body, key_id)


@router.post("/v1/tag")
async def tag(body: TagRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings)
    return await heads(request).tag(body, key_id)
