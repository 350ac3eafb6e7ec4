"""Training jobs over HTTP: upload labeled data, watch progress, get a published prompt.

curl -F file=@train.jsonl -F name=sentiment -F init="Classify the sentiment..." :8000/train
"""

from __future__ import annotations

import io

from fastapi import APIRouter, Request, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.untrusted import parse_json
from jobs.errors import UploadTooLargeError
from jobs.limits import TrainingLimits, machine_cores
from jobs.records import JobRecord
from jobs.submission import build_submission, examples_to_jsonl
from server.http.deps import AdminAuth, IdempotencyKey, Jobs, State
from server.http.errors import InvalidTrainRequestError
from server.http.openapi_responses import PNG, error_responses, event_stream
from server.http.routes.job_stream import job_event_stream
from trainer.curves import plot_curves

router = APIRouter(prefix="/train", tags=["training"])

FORM_FIELDS = ("init", "steps", "lr", "min_cosine", "eval_fraction", "task", "max_new_tokens", "processes")


def public(record: JobRecord, *, history: bool = False) -> dict:
    data = record.model_dump(mode="json", exclude=set() if history else {"history"})
    data["links"] = {
        "self": f"/train/{record.id}",
        "events": f"/train/{record.id}/events",
        "curve": f"/train/{record.id}/curve.png",
        "cancel": f"/train/{record.id}/cancel",
    }
    if record.version:
        data["links"]["generate"] = f"/generate?prompt={record.version}"
    return data


@router.post("", status_code=202, dependencies=[AdminAuth], responses=error_responses(400, 401, 403, 409, 413, 422))
async def submit_job(request: Request, jobs: Jobs, state: State, idempotency_key: IdempotencyKey = None) -> dict:
    """Start a training job from a multipart upload (`file` = JSONL, form fields `name`, `init`,
    optional `steps`, `lr`, `min_cosine`, `eval_fraction`, `task` (auto, classification or
    generation), `max_new_tokens`, `processes` (ranks sharing each batch, through torchrun), optional
    `eval_file`) or a JSON body
    (`{"name", "init", "examples": [{"input", "output"}], ...}`). Everything is validated before
    the job is queued; the answer is 202 with the job's id."""
    settings = state.settings
    limit = settings.max_upload_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > 2 * limit + 65536:  # room for two files and the form fields
        raise UploadTooLargeError(limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidTrainRequestError("Send the JSONL training data in the multipart field 'file'.")
        train_data = await _read_limited(upload, limit)
        eval_upload = form.get("eval_file")
        eval_data = await _read_limited(eval_upload, limit) if isinstance(eval_upload, UploadFile) else None
        fields = {key: form.get(key) for key in FORM_FIELDS}
        if form.get("config"):
            fields["config"] = _json_field(form.get("config"), "config")
        name, source = form.get("name"), upload.filename or "file"
    elif content_type.startswith("application/json"):
        body = _json_body(await request.body())
        train_data = examples_to_jsonl(body["examples"], "examples")
        eval_data = (
            examples_to_jsonl(body["eval_examples"], "eval_examples") if body.get("eval_examples") is not None else None
        )
        fields = {key: body.get(key) for key in (*FORM_FIELDS, "config")}
        name, source = body.get("name"), "examples"
    else:
        raise InvalidTrainRequestError("Send multipart/form-data (file upload) or application/json (examples).")
    if not isinstance(name, str) or not name:
        raise InvalidTrainRequestError("Missing 'name': the prompt name to publish the result under.")
    if not fields.get("init"):
        raise InvalidTrainRequestError("Missing 'init': the text whose token embeddings start the prompt.")
    submission = await run_in_threadpool(
        build_submission,
        name=name,
        fields=fields,
        train_data=train_data,
        eval_data=eval_data,
        size_limit=limit,
        source=source,
        limits=training_limits(state),
    )
    record = await run_in_threadpool(
        jobs.submit,
        submission.name,
        submission.config,
        submission.train_data,
        submission.eval_data,
        num_train_examples=submission.num_train,
        num_eval_examples=submission.num_eval,
        processes=submission.processes,
        idempotency=(idempotency_key, submission.sha256()) if idempotency_key else None,
    )
    return public(record)


@router.get("")
async def list_jobs(jobs: Jobs) -> dict:
    return {"jobs": [public(r) for r in await run_in_threadpool(jobs.list, "train")]}


@router.get("/{job_id}", responses=error_responses(404, 422))
async def get_job(job_id: str, jobs: Jobs) -> dict:
    return public(await run_in_threadpool(jobs.get, job_id, "train"))


@router.post("/{job_id}/cancel", dependencies=[AdminAuth], responses=error_responses(401, 403, 404, 409, 422))
async def cancel_job(job_id: str, jobs: Jobs) -> dict:
    return public(await run_in_threadpool(jobs.cancel, job_id, "train"))


@router.get("/{job_id}/curve", responses=error_responses(404, 422))
async def job_curve(job_id: str, jobs: Jobs) -> dict:
    """The training curve as JSON: step, loss and validation metric per step."""
    record = await run_in_threadpool(jobs.get, job_id, "train")
    return {"id": record.id, "history": record.history}


@router.get("/{job_id}/curve.png", response_class=Response, responses={**PNG, **error_responses(404, 422)})
async def job_curve_png(job_id: str, jobs: Jobs) -> Response:
    record = await run_in_threadpool(jobs.get, job_id, "train")
    png = await run_in_threadpool(_curve_png, record.history)
    return Response(png, media_type="image/png")


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={**event_stream("`progress` events, then `end`", "progress", "end"), **error_responses(404, 422)},
)
async def job_events(job_id: str, jobs: Jobs, request: Request) -> EventSourceResponse:
    """Server-Sent Events: one `progress` event per change, then a final `end` event."""
    return job_event_stream(jobs, await run_in_threadpool(jobs.get, job_id, "train"), request, public)


def training_limits(state) -> TrainingLimits:
    """This server's bounds on a job: its settings and cores, and, once the model is loaded, its tokenizer."""
    settings, frozen = state.settings, state.frozen
    return TrainingLimits(
        max_steps=settings.max_train_steps,
        max_new_tokens=settings.max_new_tokens_limit,
        max_processes=settings.max_train_processes,
        max_threads=machine_cores(),
        count_tokens=(lambda text: len(frozen.tokenizer(text, add_special_tokens=False)["input_ids"]))
        if frozen
        else None,
    )


def _curve_png(history: list[dict]) -> bytes:
    """Draw the curve so far (the job may still be running) with the trainer's own plot."""
    buffer = io.BytesIO()
    plot_curves(history, buffer)
    return buffer.getvalue()


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLargeError(limit)
    return data


def _json_body(data: bytes) -> dict:
    """The request's JSON object with its `examples` list (and `eval_examples`, if given, a list)."""
    try:
        body = parse_json(data)
    except ValueError as error:
        raise InvalidTrainRequestError(f"The JSON body is {error}.") from None
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list):
        raise InvalidTrainRequestError(
            "A JSON body needs 'name', 'init' and 'examples': [{\"input\", \"output\"}, ...]."
        )
    if body.get("eval_examples") is not None and not isinstance(body["eval_examples"], list):
        raise InvalidTrainRequestError(
            "'eval_examples' must be a list like 'examples': [{\"input\", \"output\"}, ...]."
        )
    return body


def _json_field(value, name: str) -> dict:
    try:
        parsed = parse_json(value) if isinstance(value, str) else None
    except ValueError as error:
        raise InvalidTrainRequestError(f"Form field {name!r} must be a JSON object; it is {error}.") from None
    if not isinstance(parsed, dict):
        raise InvalidTrainRequestError(f"Form field {name!r} must be a JSON object.")
    return parsed
