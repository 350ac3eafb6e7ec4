"""Runs jobs one at a time (FIFO) and tracks their state: training jobs in worker processes,
evaluation jobs in this process through the resident model (an injected `eval_runner`).

The manager is the only writer of job records. Workers report over stdout (see worker.py), an
evaluation reports through the same events; a worker that dies without a final report leaves
its job `failed`, never lost. On start, jobs left `running` by a previous server are marked
failed and `queued` ones run again. Both kinds share the queue, cancel and persistence.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prompt_store import IdempotencyKeyReusedError
from prompt_store.settings import absolute_model_spec
from trainer.config import TrainConfig

from .errors import JobNotFoundError, JobStateError
from .events import fold_end, fold_progress, read_events
from .job_files import CANCEL_FLAG, EVAL_DATA, TRAIN_DATA, JobFiles
from .launch import absolute_store, launch_worker
from .records import JobRecord, JobState, now, training_request

logger = logging.getLogger(__name__)

PERSIST_EVERY_SECONDS = 1.0

# eval_runner(job folder, emit(event, **fields), should_stop) -> None: scores the job's data and
# reports "started", "progress", then "succeeded" (with metrics) or "cancelled"; raising fails the job.
EvalRunner = Callable[[Path, Callable[..., None], Callable[[], bool]], None]


class InProcessJob:
    """A job running on a thread of this process, with the handful of Popen's methods the manager uses."""

    def __init__(self, target: Callable[["InProcessJob"], None], name: str):
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=target, args=(self,), name=name, daemon=True)
        self._thread.start()

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else 0

    def kill(self) -> None:  # a thread cannot be killed: it stops at its next check
        self.stopping.set()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def new_job_id() -> str:
    """Sortable by creation time: hex nanoseconds, then random bits."""
    return f"{time.time_ns():x}{secrets.token_hex(3)}"


class JobManager:
    def __init__(
        self,
        store: str | Path,
        *,
        jobs_dir: Path | None = None,
        model_spec: str,
        device: str | None = None,
        threads: int = 1,
        max_running: int = 1,
        cancel_grace_seconds: float = 30.0,
    ):
        self.store = absolute_store(str(store))  # a folder or a database URL: what the training worker publishes to
        self.files = JobFiles(jobs_dir if jobs_dir is not None else Path(self.store) / "jobs")
        self.model_spec = absolute_model_spec(model_spec)
        self.device = device
        self.threads = threads
        self.max_running = max_running
        self.cancel_grace_seconds = cancel_grace_seconds
        self._records: dict[str, JobRecord] = {}
        self._queue: deque[str] = deque()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads_held = 0  # sum of the running jobs' threads; changed under the lock, read without
        self._changed = threading.Condition()
        self._submitting = threading.Lock()
        self._last_persist: dict[str, float] = {}
        self._stopping = False
        self._dispatcher: threading.Thread | None = None
        self.eval_runner: EvalRunner | None = None  # set by the app once it can score
        self.fingerprint: Callable[[], dict | None] = lambda: None  # the served model's, once loaded (set by the app)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._changed:
            for record in self.files.load_all():
                if record.state == JobState.running:
                    self._finish(record, JobState.failed, error="interrupted: the server stopped while this job ran")
                elif record.state == JobState.queued:
                    self._queue.append(record.id)
                self._records[record.id] = record
        self._dispatcher = threading.Thread(target=self._dispatch, name="job-dispatcher", daemon=True)
        self._dispatcher.start()
        logger.info("job manager started: %d jobs on record, %d queued", len(self._records), len(self._queue))

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            procs = list(self._procs.values())
            self._changed.notify_all()
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)

    # ----------------------------------------------------------------- public API
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
        """Queue a job. `idempotency` is (key, SHA-256 of the request): a job already submitted
        with that key is returned instead of a new one; the key with another request is refused."""
        with self._submitting:  # the key check and the new record are one step
            earlier = self._submitted_with(*idempotency) if idempotency is not None else None
            if earlier is not None:
                logger.info("job %s was already submitted with this Idempotency-Key", earlier.id)
                return earlier
            return self._submit(name, config, train_data, eval_data, num_train_examples, num_eval_examples, processes,
                                idempotency)

    def submit_eval(self, request: dict, data: bytes, *, num_examples: int,
                    idempotency: tuple[str, str] | None = None) -> JobRecord:
        """Queue an evaluation: `request` holds the references and settings, `data` the labeled JSONL."""
        with self._submitting:
            earlier = self._submitted_with(*idempotency) if idempotency is not None else None
            if earlier is not None:
                logger.info("job %s was already submitted with this Idempotency-Key", earlier.id)
                return earlier
            key, digest = idempotency or (None, None)
            record = JobRecord(id=new_job_id(), kind="eval", config=request, num_eval_examples=num_examples,
                               idempotency_key=key, request_sha256=digest)
            self.files.create(record, request, {EVAL_DATA: data})
            with self._changed:
                self._records[record.id] = record
                self._queue.append(record.id)
                self._changed.notify_all()
            logger.info("job %s queued: evaluate %d references on %d examples", record.id, len(request["references"]), num_examples)
            return record.model_copy(deep=True)

    def _submitted_with(self, key: str, request_sha256: str) -> JobRecord | None:
        with self._changed:
            earlier = next((r for r in self._records.values() if r.idempotency_key == key), None)
            if earlier is None:
                return None
            if earlier.request_sha256 != request_sha256:
                raise IdempotencyKeyReusedError(key, f"it started job {earlier.id}")
            return earlier.model_copy(deep=True)

    def _submit(self, name, config, train_data, eval_data, num_train_examples, num_eval_examples, processes,
                idempotency) -> JobRecord:
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
        request = training_request(record, model=self.model_spec, device=self.device, threads=self._threads_per_process(record),
                                   fingerprint=self.fingerprint())
        self.files.create(record, request, {TRAIN_DATA: train_data, EVAL_DATA: eval_data})
        with self._changed:
            self._records[record.id] = record
            self._queue.append(record.id)
            self._changed.notify_all()
        logger.info("job %s queued: train %s (%d examples)", record.id, name, num_train_examples)
        return record.model_copy(deep=True)

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        """The job's record; with `kind`, a job of another kind is not found either."""
        with self._changed:
            record = self._records.get(job_id)
            if record is None or kind not in (None, record.kind):
                raise JobNotFoundError(job_id, kind or "train")
            return record.model_copy(deep=True)

    def list(self, kind: str | None = None) -> list[JobRecord]:
        with self._changed:
            records = sorted(self._records.values(), key=lambda r: r.id, reverse=True)
            return [r.model_copy(deep=True) for r in records if kind in (None, r.kind)]

    def result(self, job_id: str) -> dict | None:
        """An evaluation's whole table (per-example rows included), once it succeeded."""
        return self.files.load_result(job_id)

    def counts_by_state(self, kind: str | None = None) -> dict[str, int]:
        """How many jobs (of `kind`, or all) are in each state (every state listed, zeros included)."""
        with self._changed:
            counts = {state.value: 0 for state in JobState}
            for record in self._records.values():
                if kind in (None, record.kind):
                    counts[record.state.value] += 1
            return counts

    def threads_in_use(self) -> int:
        """CPU threads the running workers were given (what the serving engine leaves them).

        Read by the engine before every step, so it takes no lock: the lock is held while
        records are written to disk, and a decode step must not wait for an fsync."""
        return self._threads_held

    def _job_threads(self, record: JobRecord) -> int:
        """Threads a running job holds: evaluations run in the engine's thread and hold none extra."""
        if record.kind == "eval":
            return 0
        return self._threads_per_process(record) * record.processes

    def _threads_per_process(self, record: JobRecord) -> int:
        return record.config.get("threads") or self.threads

    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        with self._changed:
            record = self._records.get(job_id)
            if record is None or kind not in (None, record.kind):
                raise JobNotFoundError(job_id, kind or "train")
            if record.state.finished:
                raise JobStateError(f"Job {job_id} already {record.state.value}; only queued or running jobs can be cancelled.")
            if record.state == JobState.queued:
                self._queue.remove(job_id)
                self._finish(record, JobState.cancelled)
            else:
                (self.files.folder(job_id) / CANCEL_FLAG).touch()
                threading.Timer(self.cancel_grace_seconds, self._kill_if_running, args=(job_id,)).start()
                logger.info("job %s: cancel requested", job_id)
            return record.model_copy(deep=True)

    def wait_for_change(self, job_id: str, revision: int, timeout: float) -> JobRecord:
        """Block until the job's revision passes `revision` (or timeout); return the record."""
        with self._changed:
            self._changed.wait_for(
                lambda: job_id not in self._records or self._records[job_id].revision > revision or self._stopping,
                timeout=timeout,
            )
        return self.get(job_id)

    # ----------------------------------------------------------------- internals
    def _dispatch(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(
                    lambda: self._stopping or (self._queue and len(self._procs) < self.max_running)
                )
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                record = self._records[job_id]
                record.state, record.started_at = JobState.running, now()
                self._touch(record, persist=True)
                self._threads_held += self._job_threads(record)
                if record.kind == "eval":
                    self._procs[job_id] = InProcessJob(lambda handle, job_id=job_id: self._evaluate(job_id, handle),
                                                       name=f"eval-{job_id}")
                    continue
                proc = self._launch(record)
                self._procs[job_id] = proc
            threading.Thread(target=self._follow, args=(job_id, proc), name=f"job-{job_id}", daemon=True).start()

    def _launch(self, record: JobRecord) -> subprocess.Popen:
        return launch_worker(self.files.folder(record.id), threads=self._threads_per_process(record), store=self.store,
                             processes=record.processes)

    def _evaluate(self, job_id: str, handle: InProcessJob) -> None:
        """Run an evaluation job on this thread through `eval_runner`, folding its events like a worker's."""
        folder = self.files.folder(job_id)
        final = None

        def emit(event: str, **fields) -> None:
            nonlocal final
            if event == "succeeded" and fields.get("table") is not None:  # the whole table, kept beside the record
                self.files.save_result(job_id, fields.pop("table"))
            final = self._apply(job_id, {"event": event, **fields}) or final

        try:
            if self.eval_runner is None:
                raise RuntimeError("this server cannot run evaluations (no runner was set up)")
            self.eval_runner(folder, emit, lambda: handle.stopping.is_set() or (folder / CANCEL_FLAG).exists())
        except Exception as exc:  # every failure ends the job with its reason; the server goes on
            logger.exception("evaluation job %s failed", job_id)
            emit("failed", error=f"{type(exc).__name__}: {exc}")
        finally:  # whatever failed above (even saving the record), the job's place is given back
            self._ended(job_id, final, code=0)

    def _follow(self, job_id: str, proc: subprocess.Popen) -> None:
        final = None
        for event in read_events(proc.stdout):
            final = self._apply(job_id, event) or final
        self._ended(job_id, final, code=proc.wait())

    def _ended(self, job_id: str, final: str | None, *, code: int) -> None:
        """The job's process or thread is gone: release it, and fail the job if it never reported an end."""
        with self._changed:
            if self._procs.pop(job_id, None) is not None:
                self._threads_held -= self._job_threads(self._records[job_id])
            record = self._records[job_id]
            if final is None and not record.state.finished:
                if (self.files.folder(job_id) / CANCEL_FLAG).exists():
                    self._finish(record, JobState.cancelled, error="killed after cancel; nothing was published")
                    self._changed.notify_all()
                    return
                reason = "worker was stopped by the server shutting down" if self._stopping else f"worker exited with code {code}"
                self._finish(record, JobState.failed, error=f"{reason} before finishing; nothing was published")
            self._changed.notify_all()

    def _apply(self, job_id: str, event: dict) -> str | None:
        """Fold one worker event into the record; return the event name if it ends the job."""
        kind = event.pop("event", None)
        with self._changed:
            record = self._records[job_id]
            if fold_progress(record, kind, event):
                self._touch(record, persist=kind == "started")
                return None
            end = fold_end(record, kind, event)
            if end is None:
                return None
            state, error = end
            if state == JobState.cancelled and self._stopping and not (self.files.folder(job_id) / CANCEL_FLAG).exists():
                state, error = JobState.failed, "interrupted: the server stopped while this job ran"  # stopped by shutdown
            self._finish(record, state, error=error)
            return kind

    def _finish(self, record: JobRecord, state: JobState, error: str | None = None) -> None:
        record.state, record.error, record.finished_at = state, error, now()
        record.eta_seconds = None
        self._touch(record, persist=True)
        logger.info("job %s %s%s", record.id, state.value, f": {error}" if error else f" ({record.version})" if record.version else "")

    def _touch(self, record: JobRecord, *, persist: bool = False) -> None:
        """Record a change: bump the revision, wake waiters, persist (throttled for progress)."""
        record.revision += 1
        moment = time.monotonic()
        if persist or moment - self._last_persist.get(record.id, 0.0) >= PERSIST_EVERY_SECONDS:
            self.files.save(record)
            self._last_persist[record.id] = moment
        self._changed.notify_all()

    def _kill_if_running(self, job_id: str) -> None:
        with self._changed:
            proc = self._procs.get(job_id)
        if proc is not None and proc.poll() is None:
            logger.warning("job %s: did not stop within %.0f s of cancel; killing it", job_id, self.cancel_grace_seconds)
            proc.kill()
