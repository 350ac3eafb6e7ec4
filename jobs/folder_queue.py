"""The job queue of one machine: records in memory, each also in `<root>/<id>/job.json`.

A job's folder is created at submission with everything its training process reads (the
upload, request.json) and is the folder it runs in. This process's worker is the only one: a
lease cannot expire under it, so nothing is reaped. When the queue opens, jobs a previous
server left `running` end failed ("interrupted") and `queued` ones wait again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

from jobs.errors import JobNotFoundError, JobStateError
from jobs.files import EVAL_DATA, TRAIN_DATA, JobFiles
from jobs.queue import ClaimedJob, JobQueue
from jobs.records import JobRecord, JobState, now
from prompt_store import IdempotencyKeyReusedError

logger = logging.getLogger(__name__)

PERSIST_EVERY_SECONDS = 1.0  # progress reaches job.json at most this often per job (state changes at once)
INTERRUPTED = "interrupted: the server stopped while this job ran"


class FolderQueue(JobQueue):
    shared = False

    def __init__(self, root: str | Path):
        self.files = JobFiles(root)
        self.location = str(self.files.root)
        self.changed = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._queued: deque[str] = deque()
        self._max_attempts: dict[str, int] = {}
        self._cancel: set[str] = set()
        self._last_persist: dict[str, float] = {}
        for record in self.files.load_all():
            if record.state == JobState.running:
                record.state, record.error, record.finished_at, record.worker = (
                    JobState.failed,
                    INTERRUPTED,
                    now(),
                    None,
                )
                self.files.save(record)
                logger.info("job %s %s", record.id, INTERRUPTED)
            elif record.state == JobState.queued:
                self._queued.append(record.id)
            self._records[record.id] = record
        logger.info(
            "job queue in %s: %d jobs on record, %d queued", self.location, len(self._records), len(self._queued)
        )

    # ----------------------------------------------------------------- clients
    def submit(
        self, record: JobRecord, request: dict, *, train_data: bytes | None, eval_data: bytes | None, max_attempts: int
    ) -> JobRecord:
        with self.changed:  # the key check and the new record are one step
            if record.idempotency_key is not None:
                earlier = next((r for r in self._records.values() if r.idempotency_key == record.idempotency_key), None)
                if earlier is not None:
                    if earlier.request_sha256 != record.request_sha256:
                        raise IdempotencyKeyReusedError(record.idempotency_key, f"it started job {earlier.id}")
                    logger.info("job %s was already submitted with this Idempotency-Key", earlier.id)
                    return earlier.model_copy(deep=True)
            self.files.create(record, request, {TRAIN_DATA: train_data, EVAL_DATA: eval_data})
            self._records[record.id] = record
            self._max_attempts[record.id] = max_attempts
            self._queued.append(record.id)
            self.changed.notify_all()
            return record.model_copy(deep=True)

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        with self.changed:
            record = self._records.get(job_id)
            if record is None or kind not in (None, record.kind):
                raise JobNotFoundError(job_id, kind or "train")
            return record.model_copy(deep=True)

    def list(self, kind: str | None = None) -> list[JobRecord]:
        with self.changed:
            records = sorted(self._records.values(), key=lambda r: r.id, reverse=True)
            return [r.model_copy(deep=True, update={"history": []}) for r in records if kind in (None, r.kind)]

    def result(self, job_id: str) -> dict | None:
        return self.files.load_result(job_id)

    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        with self.changed:
            record = self._records.get(job_id)
            if record is None or kind not in (None, record.kind):
                raise JobNotFoundError(job_id, kind or "train")
            if record.state.finished:
                raise JobStateError(
                    f"Job {job_id} already {record.state.value}; only queued or running jobs can be cancelled."
                )
            if record.state == JobState.queued:
                self._queued.remove(job_id)
                self._end(record, JobState.cancelled)
            else:
                self._cancel.add(job_id)
                self._touch(record, persist=False)
                logger.info("job %s: cancel requested", job_id)
            return record.model_copy(deep=True)

    def counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with self.changed:
            for record in self._records.values():
                by_state = counts.setdefault(record.kind, {})
                by_state[record.state.value] = by_state.get(record.state.value, 0) + 1
        return counts

    # ----------------------------------------------------------------- workers
    def claim(self, worker: str, kinds: list[str], lease_seconds: float, max_processes: int = 64) -> ClaimedJob | None:
        with self.changed:
            job_id = next(
                (
                    i
                    for i in self._queued
                    if self._records[i].kind in kinds and self._records[i].processes <= max_processes
                ),
                None,
            )
            if job_id is None:
                return None
            self._queued.remove(job_id)
            record = self._records[job_id]
            record.state, record.worker, record.started_at = JobState.running, worker, now()
            record.attempts += 1
            self._touch(record, persist=True)
            request = self.files.load_request(job_id)
            return ClaimedJob(record.model_copy(deep=True), request)  # its upload is in its folder already

    def renew(self, worker: str, held: list[tuple[str, int]], lease_seconds: float) -> dict[tuple[str, int], bool]:
        with self.changed:
            return {
                (job_id, attempt): job_id in self._cancel
                for job_id, attempt in held
                if self._holds(worker, job_id, attempt)
            }

    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        with self.changed:
            return self._cancel.intersection(job_ids)

    def update(self, worker: str, record: JobRecord) -> bool:
        with self.changed:
            if not self._holds(worker, record.id, record.attempts):
                return False
            mine = self._records[record.id]
            for field in (
                "step",
                "total",
                "loss",
                "val_metric",
                "eta_seconds",
                "elapsed_seconds",
                "history",
                "num_train_examples",
                "num_eval_examples",
            ):
                setattr(mine, field, getattr(record, field))
            self._touch(mine, persist=False)
            return True

    def finish(
        self, worker: str, record: JobRecord, state: JobState, error: str | None = None, *, result: dict | None = None
    ) -> bool:
        with self.changed:
            if not self._holds(worker, record.id, record.attempts):
                return False
            if result is not None:
                self.files.save_result(record.id, result)
            mine = self._records[record.id]
            for field in (
                "step",
                "total",
                "loss",
                "val_metric",
                "elapsed_seconds",
                "history",
                "version",
                "metrics",
                "num_train_examples",
                "num_eval_examples",
            ):
                setattr(mine, field, getattr(record, field))
            self._end(mine, state, error)
            return True

    def release(self, worker: str, record: JobRecord, reason: str) -> None:
        with self.changed:
            if not self._holds(worker, record.id, record.attempts):
                return
            mine = self._records[record.id]
            if record.id in self._cancel:
                self._end(mine, JobState.cancelled)
            elif mine.attempts < self._max_attempts.get(record.id, 1):
                mine.state, mine.worker = JobState.queued, None
                self._queued.appendleft(record.id)
                self._touch(mine, persist=True)
            else:
                self._end(mine, JobState.failed, reason)
            logger.info("job %s released by worker %s: %s (now %s)", record.id, worker, reason, mine.state.value)

    def reap(self) -> None:
        """Nothing to reap: this process's worker is the only one, and a lease cannot expire under it."""

    # ----------------------------------------------------------------- internals (under the lock)
    def _holds(self, worker: str, job_id: str, attempt: int) -> bool:
        record = self._records.get(job_id)
        return (
            record is not None
            and record.state == JobState.running
            and record.worker == worker
            and record.attempts == attempt
        )

    def _end(self, record: JobRecord, state: JobState, error: str | None = None) -> None:
        record.state, record.error, record.finished_at, record.eta_seconds = state, error, now(), None
        self._cancel.discard(record.id)
        self._touch(record, persist=True)
        logger.info(
            "job %s %s%s",
            record.id,
            state.value,
            f": {error}" if error else f" ({record.version})" if record.version else "",
        )

    def _touch(self, record: JobRecord, *, persist: bool) -> None:
        """A change: bump the revision, persist (progress at most once a second), wake followers."""
        record.revision += 1
        moment = time.monotonic()
        if persist or moment - self._last_persist.get(record.id, 0.0) >= PERSIST_EVERY_SECONDS:
            self.files.save(record)
            self._last_persist[record.id] = moment
        self.changed.notify_all()
