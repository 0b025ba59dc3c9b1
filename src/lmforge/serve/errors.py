"""The API's errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
and the exception handlers that answer every failure in it (a 500 says only that the server
logged it: the traceback stays in the log).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmforge.serve")


class APIError(Exception):
    """A request the API answers with an error: raised anywhere below a route."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_json(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(message, type_, param, code), status_code=status, headers=headers)


def error_body(message: str, code: str | None = None) -> bytes:
    """An invalid-request error as bytes, for the layers under the app (ASGI, the connection)."""
    return json.dumps(error_json(message, code=code)).encode()


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for a body that failed validation: its first problem, with where it is."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if first.get("type") == "lone_surrogate":
        where = first["ctx"]["where"]
        return first["msg"], where or None
    message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return message, where or None


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(e.errors()))
    return error_response(400, message, "invalid_request_error", param)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    detail = e.detail if isinstance(e.detail, str) else "request failed"
    if e.status_code == 400 and "parsing the body" in detail:
        detail = "the body is not valid UTF-8 JSON"
    return error_response(e.status_code, detail, type_, headers=getattr(e, "headers", None))


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.error("request %s failed", request.state.request_id, exc_info=e)
    return error_response(500, "internal error; the server logged it", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
