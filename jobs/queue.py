"""The job queue: one interface, two backends, one worker loop over either (jobs/worker.py).

- `FolderQueue` (folder_queue.py): one machine. Records in memory and in `<jobs_dir>/<id>/job.json`;
  an upload is written once, at submission, into the folder the job runs in.
- `PostgresQueue` (postgres_queue.py): many machines. One row per job in the store's database;
  a worker writes the upload into its own job folder once, when it claims the job.

Clients (the HTTP routes, through JobService) submit, read, follow and cancel; workers claim,
renew their leases, report progress and end jobs. A worker's every write names the attempt it
claimed (`record.attempts`, a fencing token): an attempt that lost its lease changes nothing.
Every change notifies `changed`, which followers and workers wait on.
"""

from __future__ import annotations

import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from jobs.records import JobRecord, JobState


def new_job_id() -> str:
    """Sortable by creation time: hex nanoseconds, then random bits."""
    return f"{time.time_ns():x}{secrets.token_hex(3)}"


@dataclass
class ClaimedJob:
    record: JobRecord  # running, under the claiming worker's lease; record.attempts is the fencing token
    request: dict  # what was submitted besides the data (request.json)
    train_data: bytes | None = None  # the upload, when it must be written into the worker's job folder
    eval_data: bytes | None = None


class JobQueue(ABC):
    """Where jobs wait, run and end. `shared`: other processes (replicas, workers) use it too, so a
    lease can expire and a job run elsewhere: a training process checks its lease before it
    publishes (jobs/process.py)."""

    shared: bool
    location: str
    changed: threading.Condition  # notified on every change this process can see

    # ----------------------------------------------------------------- clients
    @abstractmethod
    def submit(
        self, record: JobRecord, request: dict, *, train_data: bytes | None, eval_data: bytes | None, max_attempts: int
    ) -> JobRecord:
        """Queue a job. A record with an idempotency key already used returns that job (same request)
        or raises IdempotencyKeyReusedError (another request)."""

    @abstractmethod
    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        """The job's record; JobNotFoundError (also for a job of another `kind`)."""

    @abstractmethod
    def list(self, kind: str | None = None) -> list[JobRecord]:
        """Newest first."""

    @abstractmethod
    def result(self, job_id: str) -> dict | None:
        """An evaluation's whole table, once it succeeded."""

    @abstractmethod
    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        """A queued job ends cancelled at once; a running one is flagged and its worker stops it.
        JobStateError for a job that already ended."""

    @abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs by kind, then state."""

    # ----------------------------------------------------------------- workers
    @abstractmethod
    def claim(self, worker: str, kinds: list[str], lease_seconds: float, max_processes: int = 64) -> ClaimedJob | None:
        """Take the oldest queued job of `kinds` needing at most `max_processes` processes, under a lease."""

    @abstractmethod
    def renew(self, worker: str, held: list[tuple[str, int]], lease_seconds: float) -> dict[tuple[str, int], bool]:
        """Extend the leases of `held` (job id, attempt): {(job id, attempt): cancel requested}; one
        missing from the answer is no longer this attempt's."""

    @abstractmethod
    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs a client asked to cancel."""

    @abstractmethod
    def update(self, worker: str, record: JobRecord) -> bool:
        """Write a running job's progress; False if this attempt no longer holds it."""

    @abstractmethod
    def finish(
        self, worker: str, record: JobRecord, state: JobState, error: str | None = None, *, result: dict | None = None
    ) -> bool:
        """End a job this attempt holds; False if it no longer holds it."""

    @abstractmethod
    def release(self, worker: str, record: JobRecord, reason: str) -> None:
        """A stopping worker lets go of a job: cancelled if a client asked, queued again while
        attempts remain, else failed with `reason`."""

    @abstractmethod
    def reap(self) -> None:
        """End (or queue again) the running jobs whose lease expired."""

    def start_listening(self) -> None:
        """Begin waking `changed` on changes other processes make."""

    def close(self) -> None:
        """Release connections and threads."""
