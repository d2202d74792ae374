"""Errors a caller can cause. The server maps each to an OpenAI-style error body in one place."""

from __future__ import annotations


class VLMambaError(Exception):
    """Base class: ``status`` is the HTTP status, ``param`` the offending field, ``code`` a short slug."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class InvalidRequest(VLMambaError):
    code = "invalid_request"


class ImageCountMismatch(InvalidRequest):
    code = "image_count_mismatch"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"
