"""POST /tokenize, POST /detokenize, GET /tokenizer_info (services.tokens)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmforge.serve.protocol import DetokenizeRequest, TokenizeRequest, check_model
from lmforge.serve.routes.auth import authenticate
from lmforge.serve.services.tokens import TokenService

router = APIRouter()


def tokens(request: Request) -> TokenService:
    return request.app.state.tokens


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings, request.app.state.adapters.names())
    return await tokens(request).tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, key_id: str = Depends(authenticate)):
    check_model(body.model, request.app.state.settings, request.app.state.adapters.names())
    return tokens(request).detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, key_id: str = Depends(authenticate)):
    """vLLM's shape, which lm-eval's remote tokenizer backend reads."""
    return tokens(request).info()
