"""What the OpenAPI document says each route answers: the one error body, and non-JSON successes.

Every error is `{"error": {"code": "...", "message": "...", ...details}}` (server/errors.py).
A route lists the statuses it can really give:

    @router.post("/generate", responses=error_responses(400, 404, 409, 413, 422, 503))

Declaring 422 also replaces FastAPI's default `HTTPValidationError`, which this server never sends.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    """`code` is machine-readable; some codes add fields (`limit`, `ref`, `close_matches`, `details`...)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="e.g. prompt_not_found, invalid_request, queue_full")
    message: str = Field(description="what went wrong, for people")


class ErrorResponse(BaseModel):
    error: ErrorDetail


DESCRIPTIONS: dict[int, str] = {
    400: "bad request: the body could not be parsed (JSON that is not UTF-8, malformed multipart)",
    401: "unauthorized: this route needs `Authorization: Bearer <SOFTPROMPT_API_KEY>`",
    403: "forbidden: admin_disabled (no SOFTPROMPT_API_KEY is set and the server listens beyond loopback)",
    404: "not found: prompt_not_found (with `ref`, `close_matches`) or job_not_found",
    409: "conflict: incompatible_model, name_conflict, alias_in_use, job_state_conflict",
    413: "payload too large: the body or upload exceeds the server's limit (`limit` in bytes)",
    422: "invalid: invalid_request (with `details`), invalid_name, invalid_prompt, input_too_long, "
    "invalid_train_request, invalid_training_data, invalid_training_config (with `field`), "
    "idempotency_key_reused (an Idempotency-Key sent before with another request)",
    429: "too many requests (/v1 routes): the queue is full (OpenAI SDKs retry after `Retry-After`)",
    503: "unavailable: not_ready (the model is loading or start-up failed) or queue_full "
    "(with `waiting`, `limit`, `retry_after`)",
}

HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait (sent with queue_full)", "schema": {"type": "string"}}},
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="e.g. model_not_found, context_length_exceeded, unsupported_parameter")


class OpenAIErrorResponse(BaseModel):
    """The error shape of the /v1 routes: OpenAI's, so SDKs raise their own exception classes."""

    error: OpenAIErrorDetail


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error statuses, each with `model` as its body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": model, "description": DESCRIPTIONS[status]}
        if status in HEADERS:
            responses[status]["headers"] = HEADERS[status]
    return responses


def event_stream(description: str, *events: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is (or can be) a Server-Sent Events stream of these event names, each with JSON `data`."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": list(events)},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
    }
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


PNG: dict[int | str, dict[str, Any]] = {
    200: {"description": "a PNG image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
}

PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "metrics in the Prometheus text exposition format",
        "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
    }
}


def openai_routes_answer_400(app) -> None:
    """The /v1 routes answer an invalid body with 400, as OpenAI does (server/errors.py), but
    FastAPI documents its own 422 for every route with a body: drop it there, and its schemas
    once nothing refers to them."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, item in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in item.values():
                        operation["responses"].pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            if "#/components/schemas/HTTPValidationError" not in json.dumps(schema["paths"]):
                schemas.pop("HTTPValidationError", None)
                schemas.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
