"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="math", messages=[{"role": "user", "content": "2+2?"}])

`model` names a prompt reference (`math`, `math-v3`, an alias) or the base model (no soft
prompt). Streams are Server-Sent Events of `data:` chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from server.http.deps import ClientAuth, OpenAI, State, Tenant
from server.http.errors import error_answer
from server.http.openai.models import list_models
from server.http.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.http.openapi_responses import OpenAIErrorResponse, error_responses
from server.services.generation import RequestHandle

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ClientAuth])
ERRORS = error_responses(400, 401, 404, 409, 413, 429, 503, model=OpenAIErrorResponse)
STREAM = {
    "text/event-stream": {"schema": {"type": "string", "description": "`data: {chunk}` lines, then `data: [DONE]`"}}
}


@router.get("/models", responses=error_responses(401, 503, model=OpenAIErrorResponse))
async def models(state: State, openai: OpenAI) -> dict:
    """The base model, then every prompt name (its newest version), version and alias this model can serve."""
    return await run_in_threadpool(
        list_models, state.store, openai.model_id, state.frozen.fingerprint, state.started_at
    )


@router.post("/chat/completions", responses={200: {"content": STREAM}, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, openai: OpenAI, request: Request, tenant: Tenant):
    handles = await openai.start(body, openai.chat_inputs(body), tenant)
    if body.stream:
        return EventSourceResponse(_sse(request, openai.chat_stream(body, handles)), ping=15)
    return openai.chat_response(body, handles, await _results(handles))


@router.post("/completions", responses={200: {"content": STREAM}, **ERRORS})
async def completions(body: CompletionRequest, openai: OpenAI, request: Request, tenant: Tenant):
    handles = await openai.start(body, openai.completion_inputs(body), tenant)
    if body.stream:
        return EventSourceResponse(_sse(request, openai.completion_stream(body, handles)), ping=15)
    return openai.completion_response(body, handles, await _results(handles))


async def _results(handles: list[RequestHandle]):
    """Every choice's final event; if one fails or the client leaves, the others are dropped too."""
    try:
        return await asyncio.gather(*(handle.result() for handle in handles))
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished rows


async def _sse(request: Request, chunks: AsyncIterator[str]):
    """OpenAI's stream: `data: <chunk>` events, an error in OpenAI's shape if one happens after
    the status line went out, and `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield {"data": chunk}
    except Exception as exc:
        _, body, _ = error_answer(request.url.path, exc)
        yield {"data": json.dumps(body)}
    yield {"data": "[DONE]"}
