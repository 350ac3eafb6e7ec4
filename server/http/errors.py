"""HTTP-layer errors and the ONE place where domain errors become HTTP responses.

Every error answer is JSON: `{"error": {"code": "...", "message": "...", ...details}}`.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Send

from jobs.errors import (
    InvalidEvalDataError,
    InvalidEvalRequestError,
    JobError,
    JobNotFoundError,
    JobStateError,
    UploadTooLargeError,
)
from prompt_store import (
    AliasInUseError,
    IdempotencyKeyReusedError,
    IncompatibleModelError,
    InvalidNameError,
    InvalidPromptError,
    NameConflictError,
    PromptNotFoundError,
    PromptStoreError,
    StoreUnavailableError,
    UnstorableValueError,
)
from server.engine import (
    EngineError,
    EngineNotReadyError,
    InputTooLongError,
    InvalidGenerationRequestError,
    QueueFullError,
)
from server.http.openai.errors import UnsupportedParameterError, openai_error_body, openai_status
from server.services.errors import PayloadTooLargeError
from server.services.tenants import RateLimitedError
from trainer.config import TrainConfigError
from trainer.data import DataError

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"


class UnauthorizedError(Exception):
    code = "unauthorized"


class AdminDisabledError(Exception):
    """Admin routes are off: no API key is set and the server listens beyond loopback."""

    code = "admin_disabled"


class InvalidTrainRequestError(Exception):
    """A /train request lacks a required part (file, name, init) or has the wrong content type."""

    code = "invalid_train_request"


# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[Exception], int]] = [
    (UnauthorizedError, 401),
    (AdminDisabledError, 403),
    (PayloadTooLargeError, 413),
    (UnsupportedParameterError, 400),
    (UploadTooLargeError, 413),
    (JobNotFoundError, 404),
    (JobStateError, 409),
    (DataError, 422),
    (TrainConfigError, 422),
    (InvalidTrainRequestError, 422),
    (InvalidEvalRequestError, 422),
    (PromptNotFoundError, 404),
    (IncompatibleModelError, 409),
    (NameConflictError, 409),
    (AliasInUseError, 409),
    (InvalidNameError, 422),
    (UnstorableValueError, 422),
    (InvalidPromptError, 422),
    (IdempotencyKeyReusedError, 422),
    (InputTooLongError, 422),
    (InvalidGenerationRequestError, 422),
    (QueueFullError, 503),
    (RateLimitedError, 429),
    (EngineNotReadyError, 503),
    (StoreUnavailableError, 503),
    (PromptStoreError, 400),
    (EngineError, 500),
]


# Codes for domain errors of layers that know nothing of HTTP codes.
CODES: dict[type[Exception], str] = {
    InvalidEvalDataError: "invalid_eval_data",
    DataError: "invalid_training_data",
    TrainConfigError: "invalid_training_config",
}


def error_body(exc: Exception) -> dict:
    """The JSON error for a domain exception (also used for errors inside an SSE stream)."""
    code = next((c for cls, c in CODES.items() if isinstance(exc, cls)), None) or getattr(exc, "code", "internal_error")
    body = {"code": code, "message": str(exc)}
    if isinstance(exc, PromptNotFoundError):
        body.update(ref=exc.ref, close_matches=exc.close_matches)
    elif isinstance(exc, InputTooLongError):
        body.update(limit=exc.limit, prompt_tokens=exc.prompt_tokens, max_new_tokens=exc.max_new_tokens)
    elif isinstance(exc, QueueFullError):
        body.update(waiting=exc.waiting, limit=exc.limit, retry_after=exc.retry_after)
    elif isinstance(exc, RateLimitedError):
        body.update(key_name=exc.tenant, limit_name=exc.limit, retry_after=exc.retry_after)
    elif isinstance(exc, (PayloadTooLargeError, UploadTooLargeError)):
        body.update(limit=exc.limit)
    elif isinstance(exc, TrainConfigError):
        body.update(field=exc.field)
    return {"error": body}


def status_of(exc: Exception) -> int:
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 500)


def is_openai(path: str) -> bool:
    """Routes under /v1 answer errors in OpenAI's shape (server/openai/errors.py)."""
    return path.startswith(OPENAI_PREFIX)


def error_answer(path: str, exc: Exception) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, headers) for a domain error on `path`: the one mapping every handler
    and middleware uses."""
    status, body, headers = status_of(exc), error_body(exc), {}
    if isinstance(exc, (QueueFullError, RateLimitedError)):
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, StoreUnavailableError):
        headers["Retry-After"] = "5"
    elif isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if is_openai(path):
        status = openai_status(exc, status)
        body = openai_error_body(exc, status, body["error"]["code"], body["error"]["message"])
    return status, body, headers


async def send_error(send: Send, path: str, exc: Exception, *, close: bool = False) -> None:
    """Answer with `exc` straight from ASGI middleware (before any route runs)."""
    status, body, headers = error_answer(path, exc)
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = error_answer(request.url.path, exc)
    if status >= 500 and not isinstance(exc, (QueueFullError, EngineNotReadyError, StoreUnavailableError)):
        logger.exception("error serving %s", request.url.path, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_detail(error: dict) -> dict:
    """One of FastAPI's validation errors as {loc, msg}. A body that is not JSON says where it
    breaks and why: FastAPI puts the character offset in `loc`, which would read as a field."""
    loc, msg = list(error.get("loc", ())), error.get("msg")
    if error.get("type") == "json_invalid":
        offset = loc[1] if len(loc) > 1 else 0
        reason = (error.get("ctx") or {}).get("error", "")
        loc, msg = ["body"], f"not valid JSON at character {offset} ({reason}); send a JSON object"
    return {"loc": loc, "msg": msg}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [_validation_detail(e) for e in exc.errors()]
    message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
    if is_openai(request.url.path):
        first = [str(part) for part in details[0]["loc"][1:]] if details else []  # without "body"/"query"
        return JSONResponse(
            openai_error_body(exc, 400, "invalid_request", message, param=".".join(first) or None), status_code=400
        )
    return JSONResponse({"error": {"code": "invalid_request", "message": message, "details": details}}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # RFC 9110: OPTIONS answers with, and a 405 carries, the full `Allow`
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=headers)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": str(exc.detail)}}
    if is_openai(request.url.path):
        body = openai_error_body(exc, exc.status_code, code, str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves on this path (Starlette's own 405 names one route's methods only).

    Each method is probed with a clean scope: routers (nested ones too) decide, and HEAD is listed
    only where a route really serves it."""
    path, root_path = request.scope["path"], request.scope.get("root_path", "")

    def served(method: str) -> bool:
        scope = {"type": "http", "path": path, "root_path": root_path, "method": method}
        return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)

    return ", ".join([m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") if served(m)] + ["OPTIONS"])


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s", request.url.path, exc_info=exc)
    body = {"error": {"code": "internal_error", "message": "internal server error"}}
    if is_openai(request.url.path):
        body = openai_error_body(exc, 500, "internal_error", "internal server error")
    return JSONResponse(body, status_code=500)


def register_error_handlers(app: FastAPI) -> None:
    for cls in (
        UnauthorizedError,
        AdminDisabledError,
        PayloadTooLargeError,
        UnsupportedParameterError,
        PromptStoreError,
        EngineError,
        JobError,
        DataError,
        TrainConfigError,
        InvalidTrainRequestError,
        InvalidEvalRequestError,
    ):
        app.add_exception_handler(cls, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
