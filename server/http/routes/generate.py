"""POST /generate?prompt=NAME: one completion, or a Server-Sent Events stream of it."""

from __future__ import annotations

import json

from fastapi import APIRouter, Query
from sse_starlette.sse import EventSourceResponse

from server.engine import DoneEvent, SamplingParams, TokenEvent
from server.http.deps import ClientAuth, Generation, Tenant
from server.http.errors import error_body
from server.http.openapi_responses import error_responses, event_stream
from server.http.schemas import GenerateRequest, GenerateResponse, Timings, Usage
from server.services.generation import GenerationInput, RequestHandle

router = APIRouter(tags=["generate"], dependencies=[ClientAuth])  # a client key when SOFTPROMPT_CLIENT_KEYS is set


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **event_stream("with `stream`: `token` events, then `done` or `error`", "token", "done", "error"),
        **error_responses(400, 401, 404, 409, 413, 422, 503),
    },
)
async def generate(
    body: GenerateRequest,
    service: Generation,
    tenant: Tenant,
    prompt: str | None = Query(
        None, description="prompt reference: 'math-v3', 'math' (newest), an alias; none = bare model"
    ),
    stream: bool = Query(False, description="stream tokens as Server-Sent Events"),
):
    request = GenerationInput(
        input=body.input,
        messages=[m.model_dump() for m in body.messages] if body.messages else None,
        params=SamplingParams(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop or ()),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        ),
    )
    stream = stream or body.stream
    handle = await service.start(prompt or None, request, stream=stream, tenant=tenant)
    if stream:
        return EventSourceResponse(_sse(handle), ping=15)
    return _response(await handle.result(), handle.prompt_label)


def _response(done: DoneEvent, label: str | None) -> GenerateResponse:
    return GenerateResponse(
        text=done.text,
        prompt=label,
        finish_reason=done.finish_reason,
        usage=Usage(
            prompt_tokens=done.prompt_tokens,
            soft_prompt_tokens=done.soft_prompt_tokens,
            completion_tokens=done.completion_tokens,
        ),
        timings=Timings(
            queue_ms=round(done.queue_ms, 2),
            ttft_ms=round(done.ttft_ms, 2),
            prefill_ms=round(done.prefill_ms, 2),
            decode_ms=round(done.decode_ms, 2),
            total_ms=round(done.total_ms, 2),
        ),
        batch={"joined": done.batch_sizes[0], "max": done.batch_sizes[1]},
    )


async def _sse(handle: RequestHandle):
    """Events: `token` {"text"} for each new piece, then `done` with the full response (or `error`)."""
    try:
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                yield {"event": "token", "data": json.dumps({"text": event.text})}
            elif isinstance(event, DoneEvent):
                yield {"event": "done", "data": _response(event, handle.prompt_label).model_dump_json()}
    except Exception as exc:  # the status line is already sent: report in-band
        yield {"event": "error", "data": json.dumps(error_body(exc))}
    finally:
        handle.cancel()  # no-op when finished; frees the batch slot when the client left
