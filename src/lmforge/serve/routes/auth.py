"""The dependency that every route but /health and the chat page's files runs first: the
caller's API key (`Authorization: Bearer KEY`, when the server has keys) and its request
rate limit. The key's id (never the key) is left on the request for the access log."""

from __future__ import annotations

from fastapi import Request

from lmforge.serve.errors import APIError
from lmforge.serve.security import RateLimiter
from lmforge.serve.settings import ServeSettings


async def authenticate(request: Request) -> str:
    settings: ServeSettings = request.app.state.settings
    limiter: RateLimiter = request.app.state.request_limiter
    key_id = "anonymous"
    if settings.api_keys:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key: send `Authorization: Bearer YOUR_KEY`", "authentication_error",
                           code="invalid_api_key")
        found = settings.api_keys.identify(token.strip())
        if found is None:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        key_id = found
    request.state.key_id = key_id
    wait = limiter.take(key_id, 1)
    if wait:
        raise APIError(429, f"request rate limit reached ({settings.requests_per_minute:g}/min); "
                       f"retry in {wait:.0f} s", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(int(wait))})
    return key_id
