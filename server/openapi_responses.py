"""What the OpenAPI document says each route answers: the one error body, and non-JSON successes.

Every error is `{"error": {"code": "...", "message": "...", ...details}}` (server/errors.py).
A route lists the statuses it can really give:

    @router.post("/generate", responses=error_responses(400, 404, 409, 413, 422, 503))

Declaring 422 also replaces FastAPI's default `HTTPValidationError`, which this server never sends.
"""

from __future__ import annotations

from typing import Any

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
    503: "unavailable: not_ready (the model is loading or start-up failed) or queue_full "
    "(with `waiting`, `limit`, `retry_after`)",
}

HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait (sent with queue_full)", "schema": {"type": "string"}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error statuses, each with ErrorResponse."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": DESCRIPTIONS[status]}
        if status in HEADERS:
            responses[status]["headers"] = HEADERS[status]
    return responses


def event_stream(description: str, *events: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is (or can be) a Server-Sent Events stream of these event names, each with JSON `data`."""
    event = {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"enum": list(events)}, "data": {"type": "string", "contentMediaType": "application/json"}}}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


PNG: dict[int | str, dict[str, Any]] = {
    200: {"description": "a PNG image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
}
