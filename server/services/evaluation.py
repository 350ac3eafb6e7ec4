"""Evaluation jobs scored through the resident model (the worker's `eval_runner` in a server).

`ResidentEvalRunner` runs a queued job on the model the server already holds: generated
answers are ordinary requests in the engine's batch (beside client traffic, sharing its prefix
cache), and label scoring is one `engine.call` per chunk between decode steps (serving pauses
for that batch). The job's body is jobs/evaluation.py's, as in a worker without an engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from core.modeling import FrozenModel
from jobs.evaluation import CHUNK_SIZE, MAX_EVAL_NEW_TOKENS, score_eval_job, summary
from server.engine import DoneEvent, Event, FailedEvent, GenerationRequest, QueueFullError, SamplingParams
from trainer.batches import Encoder
from trainer.compare import ComparisonCancelled, Reference, model_scorer
from trainer.data import Example
from trainer.evaluate import Task, answers_match

logger = logging.getLogger(__name__)


class EngineScorer:
    """Scores chunks through the serving engine: generation tasks as ordinary greedy requests
    (continuous batching, the prefix cache, exactly what /generate computes), classification by
    the trainer's label scoring in one `engine.call` per chunk. At most one chunk is in the queue."""

    def __init__(
        self,
        frozen: FrozenModel,
        engine,
        task: Task,
        *,
        max_new_tokens: int,
        chunk_size: int,
        should_stop: Callable[[], bool],
    ):
        self.engine, self.task, self.max_new_tokens, self.should_stop = engine, task, max_new_tokens, should_stop
        self.encoder = Encoder(frozen)  # the trainer's layout and input truncation
        self.context_length = frozen.context_length
        self.label_scorer = model_scorer(
            frozen, self.encoder, task, max_new_tokens=max_new_tokens, batch_size=chunk_size
        )

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
                    prompt_key=reference.cache_key,
                    soft=reference.vectors if reference.vectors.shape[0] else None,
                    head_ids=self.encoder.head_ids,
                    tail_ids=tail,
                    params=SamplingParams(max_new_tokens=min(self.max_new_tokens, room)),
                    sink=_resolve(future),
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
    """The embedded worker's `eval_runner`: scores a job's data through the app's engine (`state`:
    the AppState, whose model may still be loading when the job starts)."""

    def __init__(self, state, *, chunk_size: int = CHUNK_SIZE, ready_timeout_s: float = 600.0):
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
            folder,
            frozen,
            self.state.store,
            emit,
            should_stop,
            limit=limit,
            chunk_size=self.chunk_size,
            scorer=lambda task, max_new_tokens: EngineScorer(
                frozen, engine, task, max_new_tokens=max_new_tokens, chunk_size=self.chunk_size, should_stop=should_stop
            ),
        )
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
                raise RuntimeError(
                    f"the model was still loading after {self.ready_timeout_s:.0f} s; nothing was scored"
                )
