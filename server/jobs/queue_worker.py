"""A worker for jobs in the shared database: claims them, runs them, keeps their leases alive.

It runs inside a server (the embedded worker: training, and evaluations through the server's
engine) or alone on any machine that has the model and the database URL (`softprompt worker`:
training). Each training job runs in its own process (server/jobs/worker.py, through torchrun
when the job asks for several), exactly as on one machine; what it reports is written to the
job's row, where every replica reads it.

Leases (job_table.py): every heartbeat the worker renews the leases of the jobs it runs and
reaps expired ones, so a dead worker's job ends within lease + one heartbeat on any live
server or worker. A job whose lease the worker lost (reaped) or could not renew before it
would expire (the database unreachable) is killed at once: it may be running elsewhere by
then, and it must not publish. A killed worker takes its trainers with it (launch.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prompt_store import StoreUnavailableError

from .events import fold_progress, read_events
from .job_files import CANCEL_FLAG, EVAL_DATA, REQUEST, RESULT, TRAIN_DATA
from .job_table import ClaimedJob, JobTable
from .launch import launch_worker
from .records import JobRecord, JobState

logger = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.25  # progress reaches the database at most this often per job (and at every heartbeat)
FINISH_RETRY_SECONDS = 1.0


def worker_id() -> str:
    """Names the worker in job records and lease errors: host, process, and a nonce for restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass
class RunningJob:
    record: JobRecord
    folder: Path
    threads: int
    lease_deadline: float  # monotonic; past it without a renewal the job is stopped (its lease may be gone)
    proc: subprocess.Popen | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    final: tuple[JobState, str | None] | None = None
    cancel_requested: bool = False
    kill_at: float | None = None  # a cancelled job that has not stopped by then is killed
    lost: bool = False  # the lease is gone: write nothing more for this job
    ended: bool = False  # its process is gone; the end is being recorded
    dirty: bool = False
    last_write: float = 0.0

    def kill(self) -> None:
        self.stop_requested.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


class QueueWorker:
    def __init__(
        self,
        table: JobTable,
        *,
        store: str,
        model_spec: str,
        device: str | None,
        threads: int,
        concurrency: int,
        kinds: list[str],
        scratch_dir: Path,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 5.0,
        cancel_grace_seconds: float = 30.0,
        eval_runner: Callable | None = None,
    ):
        if lease_seconds < 2 * heartbeat_seconds:
            raise ValueError(f"the job lease ({lease_seconds} s) must be at least two heartbeats ({heartbeat_seconds} s)")
        self.table, self.store, self.model_spec, self.device = table, store, model_spec, device
        self.threads, self.concurrency, self.kinds = threads, concurrency, list(kinds)
        self.scratch = Path(scratch_dir)
        self.lease_seconds, self.heartbeat_seconds, self.cancel_grace_seconds = lease_seconds, heartbeat_seconds, cancel_grace_seconds
        self.eval_runner = eval_runner
        self.id = worker_id()
        self._running: dict[str, RunningJob] = {}
        self._lock = threading.Lock()
        self._threads_held = 0
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None
        self._job_threads: list[threading.Thread] = []

    @property
    def threads_held(self) -> int:
        """CPU threads this worker's training processes hold (the embedded worker's engine leaves them free)."""
        return self._threads_held

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._loop = threading.Thread(target=self._run_loop, name="job-worker", daemon=True)
        self._loop.start()
        logger.info("job worker %s started: %s jobs, %d at once, lease %.0f s, heartbeat %.0f s", self.id,
                    "/".join(self.kinds), self.concurrency, self.lease_seconds, self.heartbeat_seconds)

    def stop(self) -> None:
        """Stop every job this worker runs and hand them back (queued again while attempts remain, else failed)."""
        self._stopping.set()
        with self.table.changed:
            self.table.changed.notify_all()
        if self._loop is not None:  # first: it claims nothing more
            self._loop.join(30)
        with self._lock:
            running = list(self._running.values())
        for job in running:
            job.kill()
        for thread in list(self._job_threads):
            thread.join(30)

    # ----------------------------------------------------------------- the loop
    def _run_loop(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            moment = time.monotonic()
            try:
                if moment >= next_beat:
                    next_beat = moment + self.heartbeat_seconds
                    self._beat(reap=True)
                elif self._running:  # a notice may be a cancel
                    self._beat(reap=False)
                self._claim_while_free()
            except StoreUnavailableError as exc:
                logger.warning("job worker %s: %s", self.id, exc)
                self._fence()
            except Exception:  # the loop must outlive any single failure
                logger.exception("job worker %s: unexpected error; going on", self.id)
            with self.table.changed:
                self.table.changed.wait(max(0.05, min(self.heartbeat_seconds, next_beat - time.monotonic())))

    def _beat(self, *, reap: bool) -> None:
        if reap:
            self.table.reap()
        with self._lock:
            jobs = [job for job in self._running.values() if not job.lost]
        answer = self.table.renew(self.id, [job.record.id for job in jobs], self.lease_seconds)
        moment = time.monotonic()
        for job in jobs:
            if job.record.id not in answer:
                job.lost = True
                if not job.ended:
                    logger.error("job %s: this worker's lease was lost (reaped); stopping it, nothing will be published",
                                 job.record.id)
                    job.kill()
                continue
            job.lease_deadline = moment + self.lease_seconds - self.heartbeat_seconds
            if answer[job.record.id] and not job.cancel_requested:
                job.cancel_requested = True
                (job.folder / CANCEL_FLAG).touch()
                job.stop_requested.set()
                job.kill_at = moment + self.cancel_grace_seconds
                logger.info("job %s: cancel requested", job.record.id)
            if job.kill_at is not None and moment > job.kill_at and not job.ended:
                logger.warning("job %s: did not stop within %.0f s of cancel; killing it", job.record.id, self.cancel_grace_seconds)
                job.kill()
            if job.dirty and reap:
                self._write_progress(job)

    def _fence(self) -> None:
        """The database cannot be reached: a job whose lease may have expired meanwhile is stopped."""
        moment = time.monotonic()
        with self._lock:
            jobs = list(self._running.values())
        for job in jobs:
            if not job.ended and not job.lost and moment > job.lease_deadline:
                logger.error("job %s: could not renew its lease before it expires; stopping it", job.record.id)
                job.lost = True
                job.kill()

    def _claim_while_free(self) -> None:
        while not self._stopping.is_set() and len(self._running) < self.concurrency:
            claimed = self.table.claim(self.id, self.kinds, self.lease_seconds)
            if claimed is None:
                return
            self._start(claimed)

    # ----------------------------------------------------------------- one job
    def _start(self, claimed: ClaimedJob) -> None:
        record = claimed.record
        folder = self.scratch / record.id
        folder.mkdir(parents=True, exist_ok=True)
        for name in (CANCEL_FLAG, TRAIN_DATA, EVAL_DATA):  # a previous attempt's, on this machine
            (folder / name).unlink(missing_ok=True)
        for name, data in ((TRAIN_DATA, claimed.train_data), (EVAL_DATA, claimed.eval_data)):
            if data is not None:
                (folder / name).write_bytes(data)
        # this machine's model, device and threads; the fingerprint in the request is the one the model must have
        request = {**claimed.request, "kind": record.kind, "model": self.model_spec, "device": self.device}
        if record.kind == "train":
            request["config"] = {**request["config"], "threads": self.threads}
        else:
            request["threads"] = self.threads
        (folder / REQUEST).write_text(json.dumps(request, indent=2))
        in_process = record.kind == "eval" and self.eval_runner is not None  # through this server's engine
        threads = 0 if in_process else self.threads * record.processes
        job = RunningJob(record, folder, threads, lease_deadline=time.monotonic() + self.lease_seconds - self.heartbeat_seconds)
        with self._lock:
            self._running[record.id] = job
            self._threads_held += threads
        logger.info("job %s claimed by worker %s (attempt %d): %s", record.id, self.id, record.attempts,
                    f"train {record.name}" if record.kind == "train" else "evaluate")
        thread = threading.Thread(target=self._run, args=(job,), name=f"job-{record.id}", daemon=True)
        self._job_threads = [t for t in self._job_threads if t.is_alive()] + [thread]
        thread.start()

    def _run(self, job: RunningJob) -> None:
        code = 0
        try:
            if job.record.kind == "eval" and self.eval_runner is not None:
                self._evaluate(job)
            else:  # training, or an evaluation on a worker with no serving engine
                # Started from this thread, which lives as long as the process: the process dies with it.
                job.proc = launch_worker(job.folder, threads=self.threads, store=self.store, processes=job.record.processes)
                if self._stopping.is_set():
                    job.kill()
                for event in read_events(job.proc.stdout):
                    self._on_event(job, event)
                code = job.proc.wait()
                if job.record.kind == "eval" and job.final and job.final[0] == JobState.succeeded:
                    self._keep_result(job)
        except Exception as exc:  # every failure ends the job with its reason; the worker goes on
            logger.exception("job %s failed in worker %s", job.record.id, self.id)
            job.final = job.final or (JobState.failed, f"{type(exc).__name__}: {exc}")
        finally:
            job.ended = True
            with self._lock:
                self._threads_held -= job.threads
            self._record_end(job, code)
            with self._lock:
                self._running.pop(job.record.id, None)
            for name in (TRAIN_DATA, EVAL_DATA):  # the upload lives in the database; logs and curves stay
                (job.folder / name).unlink(missing_ok=True)
            with self.table.changed:
                self.table.changed.notify_all()  # a place is free: claim the next job now

    def _keep_result(self, job: RunningJob) -> None:
        try:
            self.table.save_result(job.record.id, json.loads((job.folder / RESULT).read_text()))
        except Exception as exc:
            job.final = (JobState.failed, f"the evaluation's table could not be kept: {type(exc).__name__}: {exc}")

    def _evaluate(self, job: RunningJob) -> None:
        self.eval_runner(job.folder, lambda event, **fields: self._on_event(job, {"event": event, **fields}),
                         lambda: job.stop_requested.is_set() or (job.folder / CANCEL_FLAG).exists())

    def _on_event(self, job: RunningJob, event: dict) -> None:
        kind = event.pop("event", None)
        record = job.record
        if fold_progress(record, kind, event):
            job.dirty = True
            if kind == "started" or time.monotonic() - job.last_write >= PROGRESS_WRITE_SECONDS:
                self._write_progress(job)
        elif kind == "succeeded":
            record.version, record.metrics = event.get("version"), event.get("metrics", {})
            job.final = (JobState.succeeded, None)
        elif kind == "failed":
            job.final = (JobState.failed, event.get("error"))
        elif kind == "cancelled":
            job.final = (JobState.cancelled, None)

    def _write_progress(self, job: RunningJob) -> None:
        if job.lost:
            return
        job.dirty, job.last_write = False, time.monotonic()
        try:
            if not self.table.update(self.id, job.record.model_copy(deep=True)):
                job.lost = True
                job.kill()
        except StoreUnavailableError:
            job.dirty = True  # written at a later heartbeat

    def _record_end(self, job: RunningJob, code: int) -> None:
        """Write how the job ended, retrying while the database is away (the lease is renewed meanwhile)."""
        while not job.lost:
            try:
                self._write_end(job, code)
                return
            except StoreUnavailableError as exc:
                logger.warning("job %s: cannot record its end yet (%s); retrying", job.record.id, exc)
                if self._stopping.wait(FINISH_RETRY_SECONDS) and time.monotonic() > job.lease_deadline:
                    return  # stopping, and the lease is about to expire: the reaper records the end
        logger.warning("job %s: its lease was lost; its end is recorded by the reaper", job.record.id)

    def _write_end(self, job: RunningJob, code: int) -> None:
        record = job.record
        if job.final is not None:
            state, error = job.final
            if state == JobState.cancelled and not job.cancel_requested:  # stopped by this worker stopping
                self.table.release(self.id, record.id, f"interrupted: worker {self.id} stopped while this job ran")
                return
            self.table.finish(self.id, record, state, error)
        elif job.cancel_requested:
            self.table.finish(self.id, record, JobState.cancelled, "killed after cancel; nothing was published")
        elif self._stopping.is_set():
            self.table.release(self.id, record.id, f"interrupted: worker {self.id} stopped while this job ran")
        else:
            self.table.finish(self.id, record, JobState.failed, f"worker exited with code {code} before finishing; "
                              "nothing was published")
