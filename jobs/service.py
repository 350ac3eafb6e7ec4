"""What the HTTP routes call: submit, read, follow and cancel jobs, over either queue, with this
process's worker (if any) running them.

    jobs = JobService.from_settings(settings)   # the queue and the worker the settings name
    jobs.start(); job = jobs.submit(...); jobs.wait_for_change(job.id, job.revision, 30); jobs.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from jobs.queue import JobQueue, new_job_id
from jobs.records import JobRecord, JobState
from jobs.settings import JobSettings
from jobs.setup import build_worker, open_queue
from jobs.worker import Worker
from prompt_store import StoreUnavailableError
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

# eval_runner(job folder, emit(event, **fields), should_stop) -> None: scores the job's data and
# reports "started", "progress", then "succeeded" (with metrics and the table) or "cancelled".
EvalRunner = Callable


class JobService:
    def __init__(
        self, queue: JobQueue, worker: Worker | None, *, max_attempts: int = 1, heartbeat_seconds: float = 5.0
    ):
        self.queue, self.worker = queue, worker
        self.max_attempts, self.heartbeat_seconds = max_attempts, heartbeat_seconds
        self.fingerprint: Callable[[], dict | None] = lambda: None  # the served model's, once loaded (set by the app)
        self._counts: dict[str, dict[str, int]] = {}  # a shared queue's, as of the last heartbeat
        self._stop = threading.Event()
        self._background: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: JobSettings) -> JobService:
        queue = open_queue(settings)
        return cls(
            queue,
            build_worker(settings, queue, embedded=True),
            max_attempts=settings.job_max_attempts,
            heartbeat_seconds=settings.job_heartbeat_seconds,
        )

    @property
    def eval_runner(self) -> EvalRunner | None:
        return self.worker.eval_runner if self.worker else None

    @eval_runner.setter
    def eval_runner(self, runner: EvalRunner | None) -> None:
        if self.worker is not None:
            self.worker.eval_runner = runner

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.queue.start_listening()
        if self.worker is not None:
            self.worker.start()  # it reaps expired leases at every heartbeat
        else:
            logger.info(
                "no embedded job worker: jobs submitted here run on other servers or `softprompt worker` processes"
            )
        if self.queue.shared:
            self._background = threading.Thread(target=self._keep_up, name="job-counts", daemon=True)
            self._background.start()

    def stop(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        if self._background is not None:
            self._background.join(5)
        self.queue.close()

    def _keep_up(self) -> None:
        """Every heartbeat, for a shared queue: count jobs by kind and state (metrics read the counts
        without a query), and, with no worker here, reap expired leases: a serving-only replica
        still ends the jobs of workers that died (the last worker may be gone)."""
        while True:
            try:
                if self.worker is None:
                    self.queue.reap()
                self._counts = self.queue.counts()
            except StoreUnavailableError:
                pass  # the counts stay as they were; the next heartbeat tries again
            except Exception:
                logger.exception("job counts or reaping failed; trying again at the next heartbeat")
            if self._stop.wait(self.heartbeat_seconds):
                return

    # ----------------------------------------------------------------- clients
    def submit(
        self,
        name: str,
        config: TrainConfig,
        train_data: bytes,
        eval_data: bytes | None,
        *,
        num_train_examples: int,
        num_eval_examples: int = 0,
        processes: int = 1,
        idempotency: tuple[str, str] | None = None,
    ) -> JobRecord:
        """Queue a training job. `idempotency` is (key, SHA-256 of the request): a job already
        submitted with that key is returned instead of a new one; the key with another request is refused."""
        key, digest = idempotency or (None, None)
        record = JobRecord(
            id=new_job_id(),
            name=name,
            config=config.to_dict(),
            total=config.steps,
            num_train_examples=num_train_examples,
            num_eval_examples=num_eval_examples,
            processes=processes,
            idempotency_key=key,
            request_sha256=digest,
        )
        # what the job's process reads besides the data; the fingerprint is the one its model must have
        request = {"kind": "train", "name": name, "config": record.config, "fingerprint": self.fingerprint()}
        saved = self.queue.submit(
            record, request, train_data=train_data, eval_data=eval_data, max_attempts=self.max_attempts
        )
        if saved.id == record.id:
            logger.info("job %s queued: train %s (%d examples)", saved.id, name, num_train_examples)
        return saved

    def submit_eval(
        self, request: dict, data: bytes, *, num_examples: int, idempotency: tuple[str, str] | None = None
    ) -> JobRecord:
        """Queue an evaluation: `request` holds the references and settings, `data` the labeled JSONL."""
        key, digest = idempotency or (None, None)
        record = JobRecord(
            id=new_job_id(),
            kind="eval",
            config=request,
            num_eval_examples=num_examples,
            idempotency_key=key,
            request_sha256=digest,
        )
        saved = self.queue.submit(
            record,
            {"kind": "eval", **request, "fingerprint": self.fingerprint()},
            train_data=None,
            eval_data=data,
            max_attempts=self.max_attempts,
        )
        if saved.id == record.id:
            logger.info(
                "job %s queued: evaluate %d references on %d examples",
                saved.id,
                len(request["references"]),
                num_examples,
            )
        return saved

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        return self.queue.get(job_id, kind)

    def list(self, kind: str | None = None) -> list[JobRecord]:
        return self.queue.list(kind)

    def result(self, job_id: str) -> dict | None:
        return self.queue.result(job_id)

    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        return self.queue.cancel(job_id, kind)

    def counts_by_state(self, kind: str | None = None) -> dict[str, int]:
        """How many jobs (of `kind`, or all) are in each state, zeros included. A shared queue's are
        as of the last heartbeat: a metrics scrape never waits on the database, or fails with it."""
        counts = {state.value: 0 for state in JobState}
        for each, by_state in (self._counts if self.queue.shared else self.queue.counts()).items():
            if kind in (None, each):
                for state, number in by_state.items():
                    counts[state] += number
        return counts

    def threads_in_use(self) -> int:
        """CPU threads this process's worker's jobs hold (what the serving engine leaves them)."""
        return self.worker.threads_held if self.worker is not None else 0

    def wait_for_change(self, job_id: str, revision: int, timeout: float) -> JobRecord:
        """Block until the job's revision passes `revision` (or timeout); return the record."""
        deadline, record = time.monotonic() + timeout, None
        while True:
            try:
                record = self.queue.get(job_id)
            except StoreUnavailableError:  # followers wait the database out; no record at all is an error
                if record is None and time.monotonic() >= deadline:
                    raise
            left = deadline - time.monotonic()
            if record is not None and (record.revision > revision or left <= 0):
                return record
            with self.queue.changed:
                self.queue.changed.wait(max(0.0, min(left, 1.0)))
