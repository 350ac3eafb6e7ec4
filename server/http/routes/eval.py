"""Evaluation jobs over HTTP: is math-v3 better than math-v2 on my data?

    curl -F file=@test.jsonl -F prompt=math-v2 -F prompt=math-v3 -F text="Solve the problem." :8000/eval

An evaluation runs in the same queue as training jobs (progress, cancel, persistence) and
scores through the model the server already holds. `GET /eval/{id}` returns the table: each
reference's score with a 95 % interval, McNemar's exact test for each pair, and (unless
`examples=false`) every example's prediction and outcome per reference.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.untrusted import parse_json
from jobs.errors import InvalidEvalDataError, InvalidEvalRequestError, UploadTooLargeError
from jobs.evaluation import build_eval_request
from jobs.records import JobRecord
from jobs.submission import examples_to_jsonl
from server.http.deps import AdminAuth, IdempotencyKey, Jobs, SettingsDep, State
from server.http.openapi_responses import error_responses, event_stream
from server.http.routes.job_stream import job_event_stream
from trainer.data import DataError

router = APIRouter(prefix="/eval", tags=["evaluation"])


def public(record: JobRecord) -> dict:
    data = record.model_dump(
        mode="json", exclude={"history", "name", "version", "loss", "val_metric", "num_train_examples"}
    )
    data["links"] = {
        "self": f"/eval/{record.id}",
        "events": f"/eval/{record.id}/events",
        "cancel": f"/eval/{record.id}/cancel",
    }
    return data


@router.post(
    "", status_code=202, dependencies=[AdminAuth], responses=error_responses(400, 401, 403, 404, 409, 413, 422)
)
async def submit_eval(
    request: Request, jobs: Jobs, state: State, settings: SettingsDep, idempotency_key: IdempotencyKey = None
) -> dict:
    """Score references on labeled data. Multipart: `file` (JSONL), repeated `prompt` fields
    (versions, aliases or names), repeated `text` fields (plain text prompts), `bare` (true: also
    no prompt), optional `task` and `max_new_tokens`. JSON: `{"examples": [{"input", "output"}],
    "prompts": [...], "texts": [...], "bare": false, "task": "auto", "max_new_tokens": null,
    "data_name": "..."}`. Everything is checked before the job exists; the answer is 202 with its id."""
    limit = settings.max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit + 65536:
        raise UploadTooLargeError(limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidEvalRequestError("Send the labeled JSONL in the multipart field 'file'.")
        data = await upload.read(limit + 1)
        fields = {
            "prompts": form.getlist("prompt"),
            "texts": form.getlist("text"),
            "bare": _flag(form.get("bare")),
            "task": form.get("task"),
            "max_new_tokens": form.get("max_new_tokens"),
            "data_name": upload.filename or "file",
        }
    elif content_type.startswith("application/json"):
        body = _json_body(await request.body())
        try:
            data = examples_to_jsonl(body["examples"], "examples")
        except DataError as error:
            raise InvalidEvalDataError(str(error)) from None
        if body.get("bare") not in (None, True, False):
            raise InvalidEvalRequestError(f"'bare' must be true or false, got {body['bare']!r}.")
        fields = {
            "prompts": _strings(body, "prompts"),
            "texts": _strings(body, "texts"),
            "bare": body.get("bare") is True,
            "task": body.get("task"),
            "max_new_tokens": body.get("max_new_tokens"),
            "data_name": body.get("data_name") if isinstance(body.get("data_name"), str) else "examples",
        }
    else:
        raise InvalidEvalRequestError("Send multipart/form-data (file upload) or application/json (examples).")
    if not all(isinstance(v, str) for v in (*fields["prompts"], *fields["texts"])):
        raise InvalidEvalRequestError("'prompt' and 'text' fields must be text, not files.")
    eval_request = await run_in_threadpool(
        build_eval_request,
        data=data,
        data_name=str(fields["data_name"])[:200],
        prompts=fields["prompts"],
        texts=fields["texts"],
        bare=fields["bare"],
        task=fields["task"],
        max_new_tokens=fields["max_new_tokens"],
        size_limit=limit,
        store=state.store,
        frozen=state.frozen,
        max_new_tokens_limit=settings.max_new_tokens_limit,
    )
    record = await run_in_threadpool(
        jobs.submit_eval,
        eval_request.request,
        eval_request.data,
        num_examples=eval_request.num_examples,
        idempotency=(idempotency_key, eval_request.sha256()) if idempotency_key else None,
    )
    return public(record)


# Reads need the admin key too: a table holds the uploaded examples and the predictions.
@router.get("", dependencies=[AdminAuth], responses=error_responses(401, 403))
async def list_evals(jobs: Jobs) -> dict:
    return {"jobs": [public(r) for r in await run_in_threadpool(jobs.list, "eval")]}


@router.get("/{job_id}", dependencies=[AdminAuth], responses=error_responses(401, 403, 404, 422))
async def get_eval(
    job_id: str,
    jobs: Jobs,
    examples: bool = Query(True, description="include every example's predictions and outcomes"),
) -> dict:
    """The job, and once it succeeded, its `table`: scores with 95 % intervals and the paired tests."""
    record = await run_in_threadpool(jobs.get, job_id, "eval")
    answer = public(record)
    table = await run_in_threadpool(jobs.result, job_id) if record.state.value == "succeeded" else None
    if table is not None and not examples:
        table = {k: v for k, v in table.items() if k != "examples"}
    answer["table"] = table
    return answer


@router.post("/{job_id}/cancel", dependencies=[AdminAuth], responses=error_responses(401, 403, 404, 409, 422))
async def cancel_eval(job_id: str, jobs: Jobs) -> dict:
    return public(await run_in_threadpool(jobs.cancel, job_id, "eval"))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    dependencies=[AdminAuth],
    responses={
        **event_stream("`progress` events, then `end`", "progress", "end"),
        **error_responses(401, 403, 404, 422),
    },
)
async def eval_events(job_id: str, jobs: Jobs, request: Request) -> EventSourceResponse:
    """Server-Sent Events: one `progress` event per change, then a final `end` event."""
    return job_event_stream(jobs, await run_in_threadpool(jobs.get, job_id, "eval"), request, public)


def _flag(value) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on")


def _strings(body: dict, key: str) -> list:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidEvalRequestError(f"'{key}' must be a list of strings.")
    return value


def _json_body(data: bytes) -> dict:
    try:
        body = parse_json(data)
    except ValueError as error:
        raise InvalidEvalRequestError(f"The JSON body is {error}.") from None
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list):
        raise InvalidEvalRequestError(
            'A JSON body needs "examples": [{"input", "output"}, ...] and "prompts", "texts" or "bare".'
        )
    return body
