"""Evaluation jobs: validate a request up front, then score it through the resident model.

`build_eval_request` refuses a bad request before any job exists (malformed data: 422 with
the line; an unknown prompt: 404; a prompt made for another model: 409). `ResidentEvalRunner`
runs a queued job on the model the server already holds: generated answers are ordinary
requests in the engine's batch (beside client traffic, sharing its prefix cache), and label
scoring is one `engine.call` per chunk between decode steps (serving pauses for that batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from prompt_store import PromptStore
from trainer.batches import Encoder
from trainer.compare import (
    ComparisonCancelled,
    Reference,
    ReferenceSpec,
    TaskHint,
    choose_max_new_tokens,
    choose_task,
    data_identity,
    load_references,
    model_scorer,
    record_results,
    reference_specs,
    run_comparison,
)
from trainer.config import TASKS
from trainer.data import DataError, Example, parse_examples
from trainer.evaluate import Task, answers_match
from trainer.modeling import FrozenModel

from .engine import DoneEvent, Event, FailedEvent, GenerationRequest, QueueFullError, SamplingParams
from .errors import InvalidEvalDataError, InvalidEvalRequestError
from .jobs.job_files import EVAL_DATA, REQUEST
from .jobs.submission import check_size
from .state import AppState

logger = logging.getLogger(__name__)

MAX_EVAL_NEW_TOKENS = 256
CHUNK_SIZE = 8  # examples in flight at once: queue places taken, or one label-scoring batch


@dataclass
class EvalRequest:
    request: dict  # what the job folder's request.json holds
    data: bytes
    num_examples: int

    def sha256(self) -> str:
        digest = hashlib.sha256(json.dumps(self.request, sort_keys=True).encode())
        digest.update(b"\0" + hashlib.sha256(self.data).digest())
        return digest.hexdigest()


def build_eval_request(*, data: bytes, data_name: str, prompts: list, texts: list, bare: bool, task: str | None,
                       max_new_tokens, size_limit: int, store: PromptStore, frozen: FrozenModel | None,
                       max_new_tokens_limit: int = MAX_EVAL_NEW_TOKENS) -> EvalRequest:
    """Check the data (every line), the references (each prompt resolves and fits the model) and the settings."""
    check_size(data, size_limit)
    task = task or "auto"
    if task not in TASKS:
        raise InvalidEvalRequestError(f"'task' must be one of {', '.join(TASKS)}, got {task!r}.")
    max_new_tokens = _max_new_tokens(max_new_tokens, min(MAX_EVAL_NEW_TOKENS, max_new_tokens_limit))
    if any("\x00" in text for text in texts if isinstance(text, str)):
        raise InvalidEvalRequestError("A 'text' prompt holds a NUL character (\\u0000); send plain text.")
    try:
        specs = reference_specs(prompts, texts, bare)
    except ValueError as error:
        raise InvalidEvalRequestError(f"{error}.") from None
    try:
        examples = parse_examples(data.decode("utf-8").splitlines(), source=data_name)
    except UnicodeDecodeError as error:
        raise InvalidEvalDataError(f"{data_name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except DataError as error:
        raise InvalidEvalDataError(str(error)) from None
    hints = []
    for spec in specs:  # unknown (404) or made for another model (409): refused now, not in the job
        if spec.kind == "prompt":
            version = store.resolve(spec.value)
            if frozen is not None:
                store.check_compatible(version, frozen.fingerprint)
            hints.append(TaskHint.from_meta(version.meta))
    try:  # the job makes the same choice with the same hints
        choose_task(hints, examples, task)
    except ValueError as error:
        raise InvalidEvalRequestError(f"{error}.") from None
    request = {"references": [{"kind": s.kind, "value": s.value} for s in specs], "task": task,
               "max_new_tokens": max_new_tokens, "data": data_identity(data, data_name, len(examples))}
    return EvalRequest(request, data, len(examples))


def _max_new_tokens(value, limit: int) -> int | None:
    """A form's digits or a JSON integer in 1..`limit`; None when not given."""
    if value in ("", None):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise InvalidEvalRequestError(f"'max_new_tokens' must be an integer from 1 to {limit} on this server, got {value!r}.")
    return value


class EngineScorer:
    """Scores chunks through the serving engine: generation tasks as ordinary greedy requests
    (continuous batching, the prefix cache, exactly what /generate computes), classification by
    the trainer's label scoring in one `engine.call` per chunk. At most one chunk is in the queue."""

    def __init__(self, frozen: FrozenModel, engine, task: Task, *, max_new_tokens: int, chunk_size: int,
                 should_stop: Callable[[], bool]):
        self.engine, self.task, self.max_new_tokens, self.should_stop = engine, task, max_new_tokens, should_stop
        self.encoder = Encoder(frozen)  # the trainer's layout and input truncation
        self.context_length = frozen.context_length
        self.label_scorer = model_scorer(frozen, self.encoder, task, max_new_tokens=max_new_tokens, batch_size=chunk_size)

    def __call__(self, reference: Reference, chunk: list[Example]) -> dict:
        if self.task.kind == "classification":
            return self._wait(self.engine.call(lambda: self.label_scorer(reference, chunk)))
        requests, futures = [], []
        try:
            for example in chunk:
                future: Future = Future()
                tail = self.encoder.query_ids(example.input)
                room = self.context_length - len(self.encoder.head_ids) - reference.vectors.shape[0] - len(tail)
                if room < 1:  # the query alone fills the context: no answer, counted wrong
                    future.set_result("")
                    futures.append(future)
                    continue
                request = GenerationRequest(
                    prompt_key=reference.cache_key, soft=reference.vectors if reference.vectors.shape[0] else None,
                    head_ids=self.encoder.head_ids, tail_ids=tail,
                    params=SamplingParams(max_new_tokens=min(self.max_new_tokens, room)), sink=_resolve(future),
                )
                self._submit(request)
                requests.append(request)
                futures.append(future)
            texts = [self._wait(future) for future in futures]
        except ComparisonCancelled:
            for request in requests:
                self.engine.cancel(request)
            raise
        return {"correct": [answers_match(text, e.output) for text, e in zip(texts, chunk)], "predictions": texts}

    def _submit(self, request: GenerationRequest) -> None:
        while True:  # a full queue is the clients' turn: wait for room
            try:
                return self.engine.submit(request)
            except QueueFullError:
                if self.should_stop():
                    raise ComparisonCancelled("evaluation cancelled while waiting for room in the queue") from None
                time.sleep(0.05)

    def _wait(self, future: Future):
        while True:  # a cancel or a shutdown must not wait behind a paused or busy engine
            try:
                return future.result(timeout=0.25)
            except FutureTimeout:
                if self.should_stop():
                    future.cancel()  # skipped by the engine if it has not started it
                    raise ComparisonCancelled("evaluation cancelled while a batch waited for the engine") from None


def _resolve(future: Future) -> Callable[[Event], None]:
    """An engine sink that completes `future` with the final text (or the failure)."""

    def sink(event: Event) -> None:
        if isinstance(event, DoneEvent) and not future.done():
            future.set_result(event.text)
        elif isinstance(event, FailedEvent) and not future.done():
            future.set_exception(event.error)

    return sink


class ResidentEvalRunner:
    """The JobManager's `eval_runner`: scores a job's data through the app's engine."""

    def __init__(self, state: AppState, *, chunk_size: int = CHUNK_SIZE, ready_timeout_s: float = 600.0):
        self.state, self.chunk_size, self.ready_timeout_s = state, chunk_size, ready_timeout_s

    def __call__(self, folder: Path, emit, should_stop) -> None:
        try:
            self._wait_for_model(should_stop)
        except ComparisonCancelled:
            emit("cancelled")
            return
        frozen, engine = self.state.frozen, self.state.engine
        limit = min(MAX_EVAL_NEW_TOKENS, self.state.settings.max_new_tokens_limit)
        table = score_eval_job(
            folder, frozen, self.state.store, emit, should_stop, limit=limit, chunk_size=self.chunk_size,
            scorer=lambda task, max_new_tokens: EngineScorer(frozen, engine, task, max_new_tokens=max_new_tokens,
                                                             chunk_size=self.chunk_size, should_stop=should_stop))
        if table is not None:
            emit("succeeded", metrics=summary(table), table=table)  # the job manager keeps the table with the job's end

    def _wait_for_model(self, should_stop) -> None:
        """Until the model is loaded; a failed load, a cancel or a shutdown ends the wait at once."""
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.state.wait_ready(0.25):
            if self.state.boot_error:
                raise RuntimeError(f"the model did not load ({self.state.boot_error}); nothing was scored")
            if should_stop():
                raise ComparisonCancelled("evaluation cancelled before the model was loaded")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model was still loading after {self.ready_timeout_s:.0f} s; nothing was scored")


def score_eval_job(folder: Path, frozen: FrozenModel, store: PromptStore, emit, should_stop, *, limit: int, chunk_size: int,
                   scorer: Callable[[Task, int], Callable], before_recording: Callable[[dict], None] = lambda table: None,
                   ) -> dict | None:
    """An evaluation job's comparison, wherever it runs: read request.json and the data in `folder`,
    score every reference with `scorer(task, max_new_tokens)`, reporting `started` and `progress`
    through `emit`; `before_recording(table)` runs before the scores are recorded with their
    versions. Returns the table, or None when the job was cancelled (`cancelled` emitted)."""
    request = json.loads((folder / REQUEST).read_text())
    examples = parse_examples((folder / EVAL_DATA).read_text(encoding="utf-8").splitlines(), source=request["data"]["name"])
    references = load_references(frozen, store, [ReferenceSpec(r["kind"], r["value"]) for r in request["references"]])
    hints = [r.hint for r in references]
    task = choose_task(hints, examples, request["task"])
    max_new_tokens = choose_max_new_tokens(hints, request["max_new_tokens"], limit=limit)
    score = scorer(task, max_new_tokens)
    emit("started", num_train_examples=0, num_eval_examples=len(examples))

    def progress(p):
        emit("progress", step=p.done, total=p.total, loss=None, val_metric=None,
             eta_seconds=p.eta_seconds, elapsed_seconds=p.elapsed_seconds)

    try:
        table = run_comparison(score, references, examples, task, data=request["data"], max_new_tokens=max_new_tokens,
                               chunk_size=chunk_size, on_progress=progress, should_stop=should_stop)
    except ComparisonCancelled:
        emit("cancelled")
        return None
    if should_stop():  # a cancel that came with the last batch: nothing is kept
        emit("cancelled")
        return None
    before_recording(table)
    job_id = request.get("job_id", folder.name)
    recorded = record_results(store, table, source=f"eval job {job_id}")
    logger.info("eval job %s: %s; recorded with %s", job_id,
                ", ".join(f"{r['reference']} {r['score']:.3f}" for r in table["results"]), ", ".join(recorded) or "no version")
    return table


def summary(table: dict) -> dict:
    """The table without its per-example rows (what job listings carry)."""
    return {k: v for k, v in table.items() if k != "examples"}
