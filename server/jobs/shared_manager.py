"""Jobs kept in the shared PostgreSQL database: the JobManager's interface for many replicas.

Any replica takes a job (its upload goes into the job's row), lists it, follows it and
cancels it; workers anywhere run it (queue_worker.py): the one embedded in each server unless
it is turned off (SOFTPROMPT_WORKER_JOBS=none), and `softprompt worker` processes on other
machines. Followers wake on the database's change notices (one listening connection per
process) and read the job's row again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prompt_store import StoreUnavailableError
from trainer.config import TrainConfig

from .job_table import JobTable
from .manager import EvalRunner, new_job_id
from .queue_worker import QueueWorker
from .records import JobRecord, JobState, training_request

logger = logging.getLogger(__name__)


class SharedJobManager:
    def __init__(
        self,
        url: str,
        *,
        jobs_dir: Path,
        model_spec: str,
        device: str | None = None,
        threads: int = 1,
        max_running: int = 1,
        worker_kinds: list[str] = ("train", "eval"),
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 5.0,
        max_attempts: int = 1,
        cancel_grace_seconds: float = 30.0,
        max_processes: int | None = None,
    ):
        self.table = JobTable(url)
        self.model_spec, self.device, self.threads, self.max_attempts = model_spec, device, threads, max_attempts
        self.worker = QueueWorker(self.table, store=url, model_spec=model_spec, device=device, threads=threads,
                                  concurrency=max_running, kinds=list(worker_kinds), scratch_dir=jobs_dir,
                                  lease_seconds=lease_seconds, heartbeat_seconds=heartbeat_seconds,
                                  cancel_grace_seconds=cancel_grace_seconds, max_processes=max_processes) if worker_kinds else None
        self.fingerprint: Callable[[], dict | None] = lambda: None  # the served model's, once loaded (set by the app)
        self.heartbeat_seconds = heartbeat_seconds
        self._counts: dict[str, dict[str, int]] = {}  # kind -> state -> jobs, as of the last heartbeat
        self._stop = threading.Event()
        self._background: threading.Thread | None = None

    @property
    def eval_runner(self) -> EvalRunner | None:
        return self.worker.eval_runner if self.worker else None

    @eval_runner.setter
    def eval_runner(self, runner: EvalRunner | None) -> None:
        if self.worker is not None:
            self.worker.eval_runner = runner

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.table.start_listening()
        if self.worker is not None:
            self.worker.start()  # it reaps expired leases at every heartbeat
        else:
            logger.info("no embedded job worker: jobs submitted here run on other servers or `softprompt worker` processes")
        self._background = threading.Thread(target=self._keep_up, name="job-counts", daemon=True)
        self._background.start()

    def stop(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        if self._background is not None:
            self._background.join(5)
        self.table.close()

    def _keep_up(self) -> None:
        """Every heartbeat: count jobs by kind and state (metrics read the counts without a query),
        and, with no worker here, reap expired leases: a serving-only replica still ends the jobs
        of workers that died (the last worker may be gone)."""
        while True:
            try:
                if self.worker is None:
                    self.table.reap()
                self._counts = self.table.counts()
            except StoreUnavailableError:
                pass  # the counts stay as they were; the next heartbeat tries again
            except Exception:
                logger.exception("job counts or reaping failed; trying again at the next heartbeat")
            if self._stop.wait(self.heartbeat_seconds):
                return

    # ----------------------------------------------------------------- the JobManager interface
    def submit(self, name: str, config: TrainConfig, train_data: bytes, eval_data: bytes | None, *,
               num_train_examples: int, num_eval_examples: int = 0, processes: int = 1,
               idempotency: tuple[str, str] | None = None) -> JobRecord:
        key, digest = idempotency or (None, None)
        record = JobRecord(id=new_job_id(), name=name, config=config.to_dict(), total=config.steps,
                           num_train_examples=num_train_examples, num_eval_examples=num_eval_examples,
                           processes=processes, idempotency_key=key, request_sha256=digest)
        # the worker fills in its own model, device and threads; the fingerprint is the one it must match
        request = training_request(record, model=self.model_spec, device=None, threads=self.threads,
                                   fingerprint=self.fingerprint())
        saved = self.table.insert(record, request, train_data=train_data, eval_data=eval_data,
                                  max_attempts=self.max_attempts)
        logger.info("job %s queued: train %s (%d examples)", saved.id, name, num_train_examples)
        return saved

    def submit_eval(self, request: dict, data: bytes, *, num_examples: int,
                    idempotency: tuple[str, str] | None = None) -> JobRecord:
        key, digest = idempotency or (None, None)
        record = JobRecord(id=new_job_id(), kind="eval", config=request, num_eval_examples=num_examples,
                           idempotency_key=key, request_sha256=digest)
        saved = self.table.insert(record, request, train_data=None, eval_data=data, max_attempts=self.max_attempts)
        logger.info("job %s queued: evaluate %d references on %d examples", saved.id, len(request["references"]), num_examples)
        return saved

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        return self.table.get(job_id, kind)

    def list(self, kind: str | None = None) -> list[JobRecord]:
        return self.table.list(kind)

    def result(self, job_id: str) -> dict | None:
        return self.table.result(job_id)

    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        return self.table.cancel(job_id, kind)

    def counts_by_state(self, kind: str | None = None) -> dict[str, int]:
        """As of the last heartbeat (a metrics scrape never waits on the database, or fails with it)."""
        counts = {state.value: 0 for state in JobState}
        for each, by_state in self._counts.items():
            if kind in (None, each):
                for state, number in by_state.items():
                    counts[state] += number
        return counts

    def threads_in_use(self) -> int:
        return self.worker.threads_held if self.worker is not None else 0

    def wait_for_change(self, job_id: str, revision: int, timeout: float) -> JobRecord:
        """Block until the job's revision passes `revision` (or timeout); return the record."""
        deadline, record = time.monotonic() + timeout, None
        while True:
            try:
                record = self.table.get(job_id)
            except StoreUnavailableError:  # followers wait the database out; no record at all is an error
                if record is None and time.monotonic() >= deadline:
                    raise
            left = deadline - time.monotonic()
            if record is not None and (record.revision > revision or left <= 0):
                return record
            with self.table.changed:
                self.table.changed.wait(max(0.0, min(left, 1.0)))
