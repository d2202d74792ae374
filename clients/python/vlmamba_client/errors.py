"""Typed exceptions. Each carries OpenAI's error fields (``message``, ``type``, ``param``, ``code``)
and the HTTP ``status`` (``None`` when no response was received)."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class APIError(Exception):
    """Base class of every error this client raises for a failed call."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, body: Any = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.body = body  # the parsed error body (or raw text) as the server sent it

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        what = f" ({self.code}{', param ' + self.param if self.param else ''})" if self.code else ""
        return f"{where}{self.message}{what}"


class BadRequestError(APIError):
    """400: invalid fields or values, bad images, prompt too long, image URL refused."""


class AuthenticationError(APIError):
    """401: the server wants an API key (``api_key=`` / ``VLMAMBA_API_KEY``) and got none or a wrong one."""


class RequestTooLargeError(APIError):
    """413: the request body is over the server's ``--max-body-bytes`` (usually: images too big)."""


class RateLimitError(APIError):
    """429: the server's queue is full. ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx, or an ``error`` event in a stream: the server failed (500), could not fetch an image
    URL (502/504) or is not ready (503)."""


class APIConnectionError(APIError):
    """No usable response: the server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The call ran past its timeout."""


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` is either seconds or an HTTP date; returns seconds (>= 0) or ``None``."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _class_for(status: int) -> type[APIError]:
    if status == 400:
        return BadRequestError
    if status == 401:
        return AuthenticationError
    if status == 413:
        return RequestTooLargeError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    return APIError


def error_from_body(status: int | None, body: Any, retry_after: float | None = None) -> APIError:
    """An OpenAI-shaped body ``{"error": {...}}`` (or anything else) -> the matching exception."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body) if body else f"HTTP {status}"}
    cls = ServerError if status is None else _class_for(status)
    kw: dict[str, Any] = dict(status=status, type=err.get("type"), param=err.get("param"), code=err.get("code"),
                              body=body)
    if cls is RateLimitError:
        kw["retry_after"] = retry_after
    return cls(str(err.get("message") or f"HTTP {status}"), **kw)


def error_from_response(response: httpx.Response) -> APIError:
    """A read (non-2xx) response -> the matching exception."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))


def error_from_transport(exc: httpx.HTTPError) -> APIConnectionError:
    """httpx's transport errors -> APITimeoutError / APIConnectionError."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc or type(exc).__name__}")
    return APIConnectionError(f"connection error: {exc or type(exc).__name__}")
