"""Errors in OpenAI's shape, so SDKs raise their own exception classes.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}

The status decides the SDK's class (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, ...); `code` is this server's own error code except where
OpenAI has a well-known one (model_not_found, context_length_exceeded, invalid_api_key).
"""

from __future__ import annotations

from prompt_store import InvalidNameError, PromptNotFoundError
from server.engine import InputTooLongError, QueueFullError


class UnsupportedParameterError(Exception):
    """A request field this server does not implement (or OpenAI does not have)."""

    code = "unsupported_parameter"

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_status(exc: Exception, status: int) -> int:
    """The status on /v1: an unknown model is 404 even when its name is malformed; a full queue
    is 429 (OpenAI's status for 'slow down', which SDKs retry after Retry-After); a refused
    parameter is 400."""
    if isinstance(exc, (PromptNotFoundError, InvalidNameError)):
        return 404
    if isinstance(exc, QueueFullError):
        return 429
    if status == 422 or isinstance(exc, UnsupportedParameterError):
        return 400
    return status


def openai_error_body(exc: Exception, status: int, code: str, message: str, *, param: str | None = None) -> dict:
    if isinstance(exc, (PromptNotFoundError, InvalidNameError)):
        matches = getattr(exc, "close_matches", [])
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        model = getattr(exc, "ref", None)
        message = (
            f"The model {model!r} does not exist.{hint} GET /v1/models lists the served models."
            if model
            else f"{message} GET /v1/models lists the served models."
        )
        code, param = "model_not_found", "model"
    elif isinstance(exc, InputTooLongError):
        code = "context_length_exceeded"
    elif isinstance(exc, UnsupportedParameterError):
        param = exc.param
    elif status == 401:
        code = "invalid_api_key"
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
