"""Server-sent events, as the OpenAI API streams: one `data: JSON` frame per chunk, then
`data: [DONE]`. An error after the response has started can only be one more frame."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from lmforge.serve.errors import APIError, error_json

# Proxies must pass tokens on as they come (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def frame(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_frame(e: APIError) -> str:
    """The frame that ends a stream which failed after it started (its status is sent already)."""
    return frame(error_json(e.message, e.type, None, e.code))


def event_stream(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)
