"""Every error a client can see, mapped to OpenAI's body in one place:
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from model.errors import VLMambaError

log = logging.getLogger(__name__)


class Unauthorized(VLMambaError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class QueueFull(VLMambaError):
    status, type, code = 429, "rate_limit_error", "queue_full"
    retry_after = 1


class ModelNotFound(VLMambaError):
    status, code = 404, "model_not_found"


class BodyTooLarge(VLMambaError):
    status, code = 413, "request_too_large"


class Unavailable(VLMambaError):
    status, type, code = 503, "server_error", "unavailable"


class EngineFailure(VLMambaError):
    status, type, code = 500, "server_error", "internal_error"


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: VLMambaError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


def _union_member(p) -> bool:
    return isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p or p[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":  # its loc is a character offset, not a field
        where = errors[0].get("loc", ("body", None))[-1]
        return f"the request body is not valid JSON (at character {where}): {errors[0].get('msg', '')}", None
    # The deepest error: for a field that is one type or another (string content or a list of
    # parts), the member the request was written as, not the one it was not.
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    # Union members appear in the location as their type ("str", "list[...]", "TextPart"): not fields.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(p)]
    param = ".".join(loc) or None
    return f"{param or 'request'}: {first.get('msg', 'invalid request')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(VLMambaError)
    async def _typed(request: Request, exc: VLMambaError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, None), exc.status_code,
                            headers=getattr(exc, "headers", None))  # e.g. the Allow of a 405

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), 500)
