"""The chat page: GET / and its two files under /static/, with no key (the page asks for one)
and headers that keep it from running anything but its own script or being framed."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from lmforge.serve.errors import APIError

router = APIRouter()

STATIC = files("lmforge.serve") / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
TYPES = {"chat.js": "text/javascript", "chat.css": "text/css"}


@router.get("/", include_in_schema=False)
async def page():
    return HTMLResponse((STATIC / "index.html").read_text(), headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    if name not in TYPES:
        raise APIError(404, "not found", "not_found_error")
    return Response((STATIC / name).read_text(), media_type=TYPES[name], headers=PAGE_HEADERS)
