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
from .jobs.job_files import EVAL_DATA, REQUEST, JobFiles
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
                       max_new_tokens, size_limit: int, store: PromptStore, frozen: FrozenModel | None) -> EvalRequest:
    """Check the data (every line), the references (each prompt resolves and fits the model) and the settings."""
    check_size(data, size_limit)
    task = task or "auto"
    if task not in TASKS:
        raise InvalidEvalRequestError(f"'task' must be one of {', '.join(TASKS)}, got {task!r}.")
    if max_new_tokens in ("", None):
        max_new_tokens = None
    else:
        try:
            max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise InvalidEvalRequestError(f"'max_new_tokens' must be an integer, got {max_new_tokens!r}.") from None
        if not 1 <= max_new_tokens <= MAX_EVAL_NEW_TOKENS:
            raise InvalidEvalRequestError(f"'max_new_tokens' must be between 1 and {MAX_EVAL_NEW_TOKENS}, got {max_new_tokens}.")
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
    for spec in specs:  # unknown (404) or made for another model (409): refused now, not in the job
        if spec.kind == "prompt":
            version = store.resolve(spec.value)
            if frozen is not None:
                store.check_compatible(version, frozen.fingerprint)
    if task == "classification":
        from trainer.evaluate import detect_task

        try:
            detect_task(examples, task)
        except ValueError as error:
            raise InvalidEvalRequestError(f"{error}.") from None
    request = {"references": [{"kind": s.kind, "value": s.value} for s in specs], "task": task,
               "max_new_tokens": max_new_tokens, "data": data_identity(data, data_name, len(examples))}
    return EvalRequest(request, data, len(examples))


class EngineScorer:
    """Scores chunks through the serving engine: generation tasks as ordinary greedy requests
    (continuous batching, the prefix cache, exactly what /generate computes), classification by
    the trainer's label scoring in one `engine.call` per chunk. At most one chunk is in the queue."""

    def __init__(self, frozen: FrozenModel, engine, task: Task, *, max_new_tokens: int, chunk_size: int,
                 should_stop: Callable[[], bool]):
        self.engine, self.task, self.max_new_tokens, self.should_stop = engine, task, max_new_tokens, should_stop
        self.encoder = Encoder(frozen)  # the trainer's layout and input truncation
        self.label_scorer = model_scorer(frozen, self.encoder, task, max_new_tokens=max_new_tokens, batch_size=chunk_size)

    def __call__(self, reference: Reference, chunk: list[Example]) -> dict:
        if self.task.kind == "classification":
            return self._wait(self.engine.call(lambda: self.label_scorer(reference, chunk)))
        requests, futures = [], []
        for example in chunk:
            future: Future = Future()
            request = GenerationRequest(
                prompt_key=reference.cache_key, soft=reference.vectors if reference.vectors.shape[0] else None,
                head_ids=self.encoder.head_ids, tail_ids=self.encoder.query_ids(example.input),
                params=SamplingParams(max_new_tokens=self.max_new_tokens), sink=_resolve(future),
            )
            self._submit(request)
            requests.append(request)
            futures.append(future)
        try:
            texts = [self._wait(future) for future in futures]
        except ComparisonCancelled:
            for request in requests:
                request.cancelled = True
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

    def __init__(self, state: AppState, files: JobFiles, *, chunk_size: int = CHUNK_SIZE, ready_timeout_s: float = 600.0):
        self.state, self.files, self.chunk_size, self.ready_timeout_s = state, files, chunk_size, ready_timeout_s

    def __call__(self, folder: Path, emit, should_stop) -> None:
        if not self.state.wait_ready(self.ready_timeout_s):
            raise RuntimeError(f"the model is not loaded ({self.state.boot_error or 'still loading'}); nothing was scored")
        frozen, engine, store = self.state.frozen, self.state.engine, self.state.store
        request = json.loads((folder / REQUEST).read_text())
        examples = parse_examples((folder / EVAL_DATA).read_text(encoding="utf-8").splitlines(), source=request["data"]["name"])
        references = load_references(frozen, store, [ReferenceSpec(r["kind"], r["value"]) for r in request["references"]])
        task = choose_task(references, examples, request["task"])
        max_new_tokens = choose_max_new_tokens(references, request["max_new_tokens"])
        score = EngineScorer(frozen, engine, task, max_new_tokens=max_new_tokens, chunk_size=self.chunk_size,
                             should_stop=should_stop)
        emit("started", num_train_examples=0, num_eval_examples=len(examples))

        def progress(p):
            emit("progress", step=p.done, total=p.total, loss=None, val_metric=None,
                 eta_seconds=p.eta_seconds, elapsed_seconds=p.elapsed_seconds)

        try:
            table = run_comparison(score, references, examples, task, data=request["data"], max_new_tokens=max_new_tokens,
                                   chunk_size=self.chunk_size, on_progress=progress, should_stop=should_stop)
        except ComparisonCancelled:
            emit("cancelled")
            return
        job_id = folder.name
        self.files.save_result(job_id, table)
        recorded = record_results(store, table, source=f"eval job {job_id}")
        logger.info("eval job %s: %s; recorded with %s", job_id,
                    ", ".join(f"{r['reference']} {r['score']:.3f}" for r in table["results"]), ", ".join(recorded) or "no version")
        emit("succeeded", metrics=summary(table))


def summary(table: dict) -> dict:
    """The table without its per-example rows (what job listings carry)."""
    return {k: v for k, v in table.items() if k != "examples"}
