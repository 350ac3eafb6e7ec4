"""The one worker loop, over either queue (jobs/queue.py): it claims jobs, runs them, keeps
their leases alive and records how they end.

It runs inside a server (the embedded worker: training, and evaluations through the server's
engine) or alone on any machine that has the model and the database URL (`softprompt worker`).
Each training job runs in a process of its own (jobs/process.py, through torchrun when the job
asks for several), in the job's folder under `jobs_dir`; what it reports goes to the queue,
where every reader sees it.

Leases: every heartbeat the worker renews the leases of the jobs it runs and reaps expired
ones, so with a shared queue a dead worker's job ends within lease + one heartbeat on any live
server or worker. A job whose lease the worker lost (reaped), or could not renew in time
(the database unreachable or slow: a watchdog thread checks every deadline, whatever the
loop is waiting on), is killed at once: it may be running elsewhere by then, and it must
not publish. A training process also checks the lease right before it publishes, and a
killed worker takes its trainers with it (launch.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.settings import absolute, absolute_model_spec
from jobs.events import fold_end, fold_progress, read_events
from jobs.files import CANCEL_FLAG, EVAL_DATA, REQUEST, RESULT, TRAIN_DATA
from jobs.launch import Lease, launch_process
from jobs.limits import machine_cores
from jobs.queue import ClaimedJob, JobQueue
from jobs.records import JobState
from jobs.running import RunningJob, worker_id
from prompt_store import StoreUnavailableError

logger = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.25  # progress reaches the database at most this often per job (and at every heartbeat)
FINISH_RETRY_SECONDS = 1.0


class Worker:
    def __init__(
        self,
        queue: JobQueue,
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
        max_processes: int | None = None,
    ):
        if lease_seconds < 2 * heartbeat_seconds:
            raise ValueError(
                f"the job lease ({lease_seconds} s) must be at least two heartbeats ({heartbeat_seconds} s)"
            )
        self.queue, self.store, self.model_spec, self.device = queue, store, absolute_model_spec(model_spec), device
        self.threads, self.concurrency, self.kinds = threads, concurrency, list(kinds)
        self.scratch = Path(absolute(scratch_dir))
        self.lease_seconds, self.heartbeat_seconds, self.cancel_grace_seconds = (
            lease_seconds,
            heartbeat_seconds,
            cancel_grace_seconds,
        )
        self.eval_runner = eval_runner
        self.max_processes = max_processes or machine_cores()  # a job needing more waits for a bigger worker
        self.id = worker_id()
        self._running: dict[tuple[str, int], RunningJob] = {}  # by (job id, attempt)
        self._lock = threading.Lock()
        self._threads_held = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._job_threads: list[threading.Thread] = []

    @property
    def threads_held(self) -> int:
        """CPU threads this worker's training processes hold (the embedded worker's engine leaves them free)."""
        return self._threads_held

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._threads = [
            threading.Thread(target=self._run_loop, name="job-worker", daemon=True),
            threading.Thread(target=self._watch_deadlines, name="job-lease-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info(
            "job worker %s started: %s jobs, %d at once, lease %.0f s, heartbeat %.0f s",
            self.id,
            "/".join(self.kinds),
            self.concurrency,
            self.lease_seconds,
            self.heartbeat_seconds,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every job this worker runs and hand them back (queued again while attempts remain, else failed)."""
        self._stopping.set()
        with self.queue.changed:
            self.queue.changed.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:  # the loop first: it claims nothing more
            thread.join(max(0.1, deadline - time.monotonic()))
        for job in self._jobs():
            job.kill()
        for thread in list(self._job_threads):
            thread.join(max(0.1, deadline - time.monotonic()))

    def _jobs(self) -> list[RunningJob]:
        with self._lock:
            return list(self._running.values())

    # ----------------------------------------------------------------- the loop
    def _run_loop(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            moment = time.monotonic()
            try:
                if moment >= next_beat:
                    next_beat = moment + self.heartbeat_seconds
                    self._beat()
                elif self._running:  # a notice may be a cancel
                    self._apply_cancels(self.queue.cancels_requested([job.record.id for job in self._jobs()]))
                self._claim_while_free()
            except StoreUnavailableError as exc:
                logger.warning("job worker %s: %s", self.id, exc)
            except Exception:  # the loop must outlive any single failure
                logger.exception("job worker %s: unexpected error; going on", self.id)
            with self.queue.changed:
                self.queue.changed.wait(max(0.05, min(self.heartbeat_seconds, next_beat - time.monotonic())))

    def _beat(self) -> None:
        """Renew this worker's leases (first: its own jobs must not look expired to its own reaper),
        then reap everyone's expired ones, and write progress that was held back."""
        jobs = [job for job in self._jobs() if not job.lost]
        asked = time.monotonic()  # the database counts the lease from about now, whatever the call then waits
        answer = self.queue.renew(self.id, [job.key for job in jobs], self.lease_seconds)
        for job in jobs:
            if job.key not in answer:
                self._lose(job, "this worker's lease was lost (reaped)")
            else:
                job.lease_deadline = asked + self.lease_seconds - self.heartbeat_seconds
        self._apply_cancels({job_id for (job_id, _), cancel in answer.items() if cancel})
        self.queue.reap()
        for job in jobs:
            if job.dirty and not job.lost:
                self._write_progress(job)

    def _apply_cancels(self, cancelled: set[str]) -> None:
        moment = time.monotonic()
        for job in self._jobs():
            if job.record.id in cancelled and not job.cancel_requested:
                job.cancel_requested = True
                (job.folder / CANCEL_FLAG).touch()
                job.stop_requested.set()
                job.kill_at = moment + self.cancel_grace_seconds
                logger.info("job %s: cancel requested", job.record.id)

    def _watch_deadlines(self) -> None:
        """Stop a job whose lease may have expired (its renewal failed or is stuck), and a cancelled
        job that outlived its grace period. Runs on its own so a database call cannot hold it up."""
        while not self._stopping.wait(0.25):
            moment = time.monotonic()
            for job in self._jobs():
                if job.ended or job.lost:
                    continue
                if moment > job.lease_deadline:
                    self._lose(job, "its lease could not be renewed in time")
                elif job.kill_at is not None and moment > job.kill_at:
                    logger.warning(
                        "job %s: did not stop within %.0f s of cancel; killing it",
                        job.record.id,
                        self.cancel_grace_seconds,
                    )
                    job.kill_at = None
                    job.kill()

    def _lose(self, job: RunningJob, why: str) -> None:
        if job.lost:
            return
        job.lost = True
        if not job.ended:
            logger.error("job %s: %s; stopping it, nothing will be published", job.record.id, why)
            job.kill()

    def _claim_while_free(self) -> None:
        while not self._stopping.is_set() and len(self._running) < self.concurrency:
            asked = time.monotonic()  # the database's lease counts from about now
            claimed = self.queue.claim(self.id, self.kinds, self.lease_seconds, self.max_processes)
            if claimed is None:
                return
            try:
                self._start(claimed, lease_deadline=asked + self.lease_seconds - self.heartbeat_seconds)
            except Exception as exc:  # e.g. the local disk is full: the job ends now, not at its lease's expiry
                logger.exception("job %s: could not be started", claimed.record.id)
                with self._lock:
                    self._running.pop((claimed.record.id, claimed.record.attempts), None)
                self.queue.finish(
                    self.id,
                    claimed.record,
                    JobState.failed,
                    f"worker {self.id} could not start it: {type(exc).__name__}: {exc}",
                )

    # ----------------------------------------------------------------- one job
    def _start(self, claimed: ClaimedJob, *, lease_deadline: float) -> None:
        record = claimed.record
        # a shared queue's attempt runs in a folder of its own; a local queue's job has one folder, its upload in it
        again = record.attempts > 1 and self.queue.shared
        folder = self.scratch / (f"{record.id}.{record.attempts}" if again else record.id)
        folder.mkdir(parents=True, exist_ok=True)
        # Written once, where the training process reads them: a local queue wrote them at submission.
        for name, data in ((TRAIN_DATA, claimed.train_data), (EVAL_DATA, claimed.eval_data)):
            if data is not None:
                (folder / name).write_bytes(data)
        if not (folder / REQUEST).exists():
            (folder / REQUEST).write_text(json.dumps(claimed.request, indent=2))
        in_process = record.kind == "eval" and self.eval_runner is not None  # through this server's engine
        per_process = record.config.get("threads") or self.threads if record.kind == "train" else self.threads
        threads = 0 if in_process else per_process * record.processes
        job = RunningJob(record, folder, threads, lease_deadline=lease_deadline)
        job.threads_per_process = per_process
        with self._lock:
            self._running[job.key] = job
            self._threads_held += threads
        logger.info(
            "job %s claimed by worker %s (attempt %d): %s",
            record.id,
            self.id,
            record.attempts,
            f"train {record.name}" if record.kind == "train" else "evaluate",
        )
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
                # With a shared queue the job may run elsewhere once its lease is lost: the process checks it.
                lease = Lease(self.id, job.record.attempts, self.heartbeat_seconds) if self.queue.shared else None
                job.proc = launch_process(
                    job.folder,
                    threads=job.threads_per_process,
                    store=self.store,
                    processes=job.record.processes,
                    model=self.model_spec,
                    device=self.device,
                    lease=lease,
                )
                if self._stopping.is_set() or job.lost:
                    job.kill()
                for event in read_events(job.proc.stdout):
                    self._on_event(job, event)
                code = job.proc.wait()
                if job.record.kind == "eval" and job.final and job.final[0] == JobState.succeeded:
                    job.table = json.loads((job.folder / RESULT).read_text())
        except Exception as exc:  # every failure ends the job with its reason; the worker goes on
            logger.exception("job %s failed in worker %s", job.record.id, self.id)
            job.kill()  # nothing of it may run on once it is recorded as ended
            if job.proc is not None:
                job.proc.wait()
            job.final = (JobState.failed, f"{type(exc).__name__}: {exc}")
        finally:
            job.ended = True
            with self._lock:
                self._threads_held -= job.threads
            try:
                self._record_end(job, code)
            finally:
                with self._lock:
                    self._running.pop(job.key, None)
                if self.queue.shared:  # the upload lives in the database; logs and curves stay
                    for name in (TRAIN_DATA, EVAL_DATA):
                        (job.folder / name).unlink(missing_ok=True)
                with self.queue.changed:
                    self.queue.changed.notify_all()  # a place is free: claim the next job now

    def _evaluate(self, job: RunningJob) -> None:
        self.eval_runner(
            job.folder,
            lambda event, **fields: self._on_event(job, {"event": event, **fields}),
            lambda: job.stop_requested.is_set() or (job.folder / CANCEL_FLAG).exists(),
        )

    def _on_event(self, job: RunningJob, event: dict) -> None:
        kind = event.pop("event", None)
        record = job.record
        if fold_progress(record, kind, event):
            job.dirty = True
            if kind == "started" or time.monotonic() - job.last_write >= PROGRESS_WRITE_SECONDS:
                self._write_progress(job)
        elif (end := fold_end(record, kind, event)) is not None:
            job.final = end
            job.table = event.get("table")  # an in-process evaluation's result, with its success

    def _write_progress(self, job: RunningJob) -> None:
        if job.lost:
            return
        job.dirty, job.last_write = False, time.monotonic()
        try:
            if not self.queue.update(self.id, job.record.model_copy(deep=True)):
                self._lose(job, "its lease is no longer this attempt's")
        except StoreUnavailableError:
            job.dirty = True  # written at a later heartbeat

    def _record_end(self, job: RunningJob, code: int) -> None:
        """Write how the job ended, retrying while the database is away (the loop renews the lease meanwhile)."""
        while not job.lost:
            try:
                self._write_end(job, code)
                return
            except StoreUnavailableError as exc:
                logger.warning("job %s: cannot record its end yet (%s); retrying", job.record.id, exc)
                if self._stopping.is_set() and time.monotonic() > job.lease_deadline:
                    return  # stopping, and the lease is about to expire: the reaper records the end
                time.sleep(FINISH_RETRY_SECONDS)
            except Exception:
                logger.exception(
                    "job %s: recording its end failed; its lease will expire and the reaper ends it", job.record.id
                )
                return
        try:  # if the lease is in fact still this attempt's (a renewal that came too late), hand the job back now
            self.queue.release(
                self.id,
                job.record,
                f"worker {self.id} could not renew its lease in time and stopped the job; nothing was published",
            )
        except Exception as exc:
            logger.warning("job %s: its lease was lost (%s); the reaper records its end", job.record.id, exc)

    def _write_end(self, job: RunningJob, code: int) -> None:
        record = job.record
        interrupted = f"interrupted: worker {self.id} stopped while this job ran"
        if job.final is not None:
            state, error = job.final
            if state == JobState.cancelled and not job.cancel_requested:  # stopped by this worker stopping
                self.queue.release(self.id, record, interrupted)
                return
            self.queue.finish(self.id, record, state, error, result=job.table if state == JobState.succeeded else None)
        elif job.cancel_requested:
            self.queue.finish(self.id, record, JobState.cancelled, "killed after cancel; nothing was published")
        elif self._stopping.is_set():
            self.queue.release(self.id, record, interrupted)
        else:
            self.queue.finish(
                self.id,
                record,
                JobState.failed,
                f"worker exited with code {code} before finishing; nothing was published",
            )
