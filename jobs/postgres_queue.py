"""Jobs in the shared PostgreSQL database: the table every server and worker reads and writes.

Claiming and leasing are a few statements on one table, written here rather than taken from
a queue library (procrastinate, pgqueuer), because a job here is more than a queue entry: its
record (step, loss, curve, metrics) must be readable and followable from every replica, its
upload must travel with it, an Idempotency-Key must find it, and its lease must fence a
trainer subprocess. A library would hold the queue state in its own tables and migrations
beside ours, and every state change (cancel, lease lost, progress) would then have to be
kept consistent across two schemas; the statements below do it in one row, in one
transaction each:

- claim: `SELECT ... FOR UPDATE SKIP LOCKED` picks the oldest queued job no one else is
  claiming; the same statement marks it running under the caller's lease (database time,
  so the machines' clocks do not matter).
- renew: the holder extends its leases; a lease it no longer holds (reaped) comes back
  missing, and the holder stops that job. Every write of a holder names the attempt it
  claimed (a fencing token): an attempt that lost its lease changes nothing, even when the
  same worker has claimed the job again since.
- reap: any server or worker turns running jobs whose lease expired into failed (or queued
  again, while attempts remain), with an error that names the silent worker.
- every write bumps `revision` and NOTIFYs `softprompt_jobs`, which followers wait on.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from psycopg.types.json import Jsonb

from core.database import SESSION, Database
from core.schema import migrate
from jobs.errors import JobNotFoundError, JobStateError
from jobs.queue import ClaimedJob, JobQueue
from jobs.records import JobRecord, JobState, now
from prompt_store import IdempotencyKeyReusedError
from prompt_store.base import json_safe

logger = logging.getLogger(__name__)

CHANNEL = "softprompt_jobs"
# The record as the API shows it: the columns are the truth for state, revision and lease holder.
# After the job ends the record keeps the worker that ran it last.
RECORD = (
    "record || jsonb_build_object('state', state, 'revision', revision, 'attempts', attempts, "
    "'worker', coalesce(worker, record->>'worker'))"
)
LEASE_EXPIRED = (
    "worker %s stopped renewing its lease (killed, or cut off from the database); attempt %s ended "
    "and nothing was published"
)
PROGRESS_RESET = {
    "step": 0,
    "loss": None,
    "val_metric": None,
    "eta_seconds": None,
    "elapsed_seconds": None,
    "history": [],
    "error": None,
    "finished_at": None,
}


class PostgresQueue(JobQueue):
    shared = True

    def __init__(self, url: str, *, pool_size: int = 4):
        self._db = Database(url, pool_size=pool_size, channel=CHANNEL, name="softprompt-jobs")
        self.location = self._db.location
        try:
            with self._db.connection() as conn:
                migrate(conn)
        except BaseException:
            self._db.close()
            raise
        self.changed = threading.Condition()  # notified on every NOTIFY (and at least once a second)
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    # ----------------------------------------------------------------- change notices
    def start_listening(self) -> None:
        self._listener = threading.Thread(target=self._listen, name="job-notices", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            self._db.wait_for_change(1.0, self._stop)
            with self.changed:
                self.changed.notify_all()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5)
        self._db.close()

    def _notify(self, conn: psycopg.Connection, job_id: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, job_id))

    # ----------------------------------------------------------------- submitting and reading
    def submit(
        self, record: JobRecord, request: dict, *, train_data: bytes | None, eval_data: bytes | None, max_attempts: int
    ) -> JobRecord:
        """Queue a job; with an idempotency key already used, return that job (same request) or refuse it."""
        with self._db.transaction() as conn:
            inserted = conn.execute(
                "INSERT INTO softprompt_jobs (id, kind, state, record, request, train_data, eval_data, "
                "idempotency_key, "
                "processes, max_attempts) VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                (
                    record.id,
                    record.kind,
                    Jsonb(_record_json(record)),
                    Jsonb(json_safe(request)),
                    train_data,
                    eval_data,
                    record.idempotency_key,
                    record.processes,
                    max_attempts,
                ),
            ).fetchone()
            if inserted is not None:
                self._notify(conn, record.id)
        if inserted is None:
            earlier = self._one("WHERE idempotency_key = %s", (record.idempotency_key,))
            if earlier.request_sha256 != record.request_sha256:
                raise IdempotencyKeyReusedError(record.idempotency_key, f"it started job {earlier.id}")
            logger.info("job %s was already submitted with this Idempotency-Key", earlier.id)
            return earlier
        return self.get(record.id)

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        if "\x00" in job_id:  # a text column cannot hold it, so no job has it
            raise JobNotFoundError(job_id, kind or "train")
        found = self._records("WHERE id = %s AND (%s::text IS NULL OR kind = %s)", (job_id, kind, kind))
        if not found:
            raise JobNotFoundError(job_id, kind or "train")
        return found[0]

    def _one(self, where: str, params: tuple) -> JobRecord:
        return self._records(where, params)[0]

    def _records(self, where: str, params: tuple, *, history: bool = True) -> list[JobRecord]:
        record = RECORD if history else f"({RECORD}) - 'history'"
        with self._db.connection() as conn:
            rows = conn.execute(f"SELECT {record} FROM softprompt_jobs {where}", params).fetchall()
        return [JobRecord.model_validate(row) for (row,) in rows]

    def list(self, kind: str | None = None) -> list[JobRecord]:
        """Newest first, without the per-step history (listings do not show it)."""
        return self._records("WHERE (%s::text IS NULL OR kind = %s) ORDER BY id DESC", (kind, kind), history=False)

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs by kind, then state."""
        with self._db.connection() as conn:
            rows = conn.execute("SELECT kind, state, count(*) FROM softprompt_jobs GROUP BY kind, state").fetchall()
        counts: dict[str, dict[str, int]] = {}
        for kind, state, number in rows:
            counts.setdefault(kind, {})[state] = number
        return counts

    def result(self, job_id: str) -> dict | None:
        with self._db.connection() as conn:
            row = conn.execute("SELECT result FROM softprompt_jobs WHERE id = %s", (job_id,)).fetchone()
        return row[0] if row else None

    def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        """A queued job ends cancelled at once; a running one is flagged, and its worker stops it."""
        if "\x00" in job_id:
            raise JobNotFoundError(job_id, kind or "train")
        with self._db.transaction() as conn:
            row = conn.execute(
                "UPDATE softprompt_jobs SET cancel_requested = true, revision = revision + 1, "
                "state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, "
                "record = CASE WHEN state = 'queued' THEN record || jsonb_build_object('finished_at', %s::text) ELSE "
                "record END "
                "WHERE id = %s AND (%s::text IS NULL OR kind = %s) AND state IN ('queued', 'running') RETURNING state",
                (now(), job_id, kind, kind),
            ).fetchone()
            if row is not None:
                self._notify(conn, job_id)
        record = self.get(job_id, kind)  # not found: 404
        if row is None:
            raise JobStateError(
                f"Job {job_id} already {record.state.value}; only queued or running jobs can be cancelled."
            )
        logger.info("job %s: %s", job_id, "cancelled" if row[0] == "cancelled" else "cancel requested")
        return record

    # ----------------------------------------------------------------- workers
    # A worker's writes name the job, the worker and the attempt it claimed (the fencing token):
    # a write from an attempt that lost its lease, even by the same worker, changes nothing.
    HELD = "id = %s AND worker = %s AND attempts = %s AND state = 'running'"

    def claim(self, worker: str, kinds: list[str], lease_seconds: float, max_processes: int = 64) -> ClaimedJob | None:
        """Take the oldest queued job of `kinds` that needs at most `max_processes` processes under a
        lease, or None; never the same job twice."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "UPDATE softprompt_jobs SET state = 'running', worker = %s, attempts = attempts + 1, revision = "
                "revision + 1, "
                f"lease_expires_at = now() + make_interval(secs => %s), "
                f"record = record || %s || jsonb_build_object('started_at', %s::text) "
                f"WHERE id = (SELECT id FROM softprompt_jobs WHERE state = 'queued' AND kind = ANY(%s) "
                f"            AND processes <= %s AND NOT cancel_requested ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) "
                f"RETURNING {RECORD}, request, train_data, eval_data",
                (worker, lease_seconds, Jsonb(PROGRESS_RESET), now(), kinds, max_processes),
            ).fetchone()
            if row is not None:
                self._notify(conn, row[0]["id"])
        if row is None:
            return None
        record, request, train_data, eval_data = row
        return ClaimedJob(JobRecord.model_validate(record), request, train_data, eval_data)

    def renew(self, worker: str, held: list[tuple[str, int]], lease_seconds: float) -> dict[tuple[str, int], bool]:
        """Extend the leases of `held` (job id, attempt) that `worker` still holds: {(job id, attempt):
        cancel requested}; one missing from the answer is no longer this attempt's (it was reaped)."""
        if not held:
            return {}
        ids, attempts = [job_id for job_id, _ in held], [attempt for _, attempt in held]
        with self._db.connection() as conn:
            rows = conn.execute(
                "UPDATE softprompt_jobs SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE (id, attempts) IN (SELECT * FROM unnest(%s::text[], %s::integer[])) AND worker = %s "
                "AND state = 'running' RETURNING id, attempts, cancel_requested",
                (lease_seconds, ids, attempts, worker),
            ).fetchall()
        return {(job_id, attempt): cancel for job_id, attempt, cancel in rows}

    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs a client asked to cancel (a read, for the moments between heartbeats)."""
        if not job_ids:
            return set()
        with self._db.connection() as conn:
            rows = conn.execute(
                "SELECT id FROM softprompt_jobs WHERE id = ANY(%s) AND cancel_requested", (job_ids,)
            ).fetchall()
        return {job_id for (job_id,) in rows}

    def update(self, worker: str, record: JobRecord) -> bool:
        """Write a running job's progress; False if this attempt no longer holds it."""
        with self._db.transaction() as conn:
            row = conn.execute(
                f"UPDATE softprompt_jobs SET record = %s, revision = revision + 1 WHERE {self.HELD} RETURNING id",
                (Jsonb(_record_json(record)), record.id, worker, record.attempts),
            ).fetchone()
            if row is not None:
                self._notify(conn, record.id)
        return row is not None

    def finish(
        self, worker: str, record: JobRecord, state: JobState, error: str | None = None, *, result: dict | None = None
    ) -> bool:
        """End a job this attempt holds: succeeded (with an evaluation's table), failed or cancelled.
        False if it no longer holds it."""
        record.state, record.error, record.finished_at, record.eta_seconds = state, error, now(), None
        with self._db.transaction() as conn:
            row = conn.execute(
                f"UPDATE softprompt_jobs SET state = %s, record = %s, result = coalesce(%s, result), worker = NULL, "
                f"lease_expires_at = NULL, revision = revision + 1 WHERE {self.HELD} RETURNING id",
                (
                    state.value,
                    Jsonb(_record_json(record)),
                    Jsonb(json_safe(result)) if result is not None else None,
                    record.id,
                    worker,
                    record.attempts,
                ),
            ).fetchone()
            if row is not None:
                self._notify(conn, record.id)
        if row is None:
            logger.warning("job %s: not recorded as %s, its lease was lost to the reaper", record.id, state.value)
        else:
            logger.info(
                "job %s %s%s",
                record.id,
                state.value,
                f": {error}" if error else f" ({record.version})" if record.version else "",
            )
        return row is not None

    def release(self, worker: str, record: JobRecord, reason: str) -> None:
        """A worker stopping lets go of a job it held: cancelled if a client asked, else queued
        again while attempts remain, else failed with `reason`."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "UPDATE softprompt_jobs SET "
                "state = CASE WHEN cancel_requested THEN 'cancelled' WHEN attempts < max_attempts THEN 'queued' "
                "        ELSE 'failed' END, "
                "worker = NULL, lease_expires_at = NULL, revision = revision + 1, "
                "record = record || CASE WHEN cancel_requested THEN jsonb_build_object('finished_at', %s::text) "
                "                        WHEN attempts < max_attempts THEN jsonb_build_object('worker', NULL) "
                "                        ELSE jsonb_build_object('error', %s::text, 'finished_at', %s::text) END "
                f"WHERE {self.HELD} RETURNING state",
                (now(), reason, now(), record.id, worker, record.attempts),
            ).fetchone()
            if row is not None:
                self._notify(conn, record.id)
        if row is not None:
            logger.info("job %s released by worker %s: %s (now %s)", record.id, worker, reason, row[0])

    def reap(self) -> list[tuple[str, str]]:  # type: ignore[override]
        """Jobs whose lease expired: failed (or queued again while attempts remain). Returns (id, new state)."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "WITH expired AS (SELECT id, worker FROM softprompt_jobs WHERE state = 'running' AND "
                "lease_expires_at < now() "
                "                 FOR UPDATE SKIP LOCKED) "
                "UPDATE softprompt_jobs AS job SET "
                "  state = CASE WHEN job.cancel_requested THEN 'cancelled' WHEN job.attempts < job.max_attempts THEN "
                "'queued' "
                "          ELSE 'failed' END, "
                "  worker = NULL, lease_expires_at = NULL, revision = job.revision + 1, "
                "  record = job.record || jsonb_build_object("
                "    'error', CASE WHEN job.cancel_requested THEN NULL ELSE format(%s, expired.worker, job.attempts) "
                "END, "
                "    'finished_at', CASE WHEN job.attempts < job.max_attempts AND NOT job.cancel_requested THEN NULL "
                "                   ELSE %s::text END, "
                "    'worker', CASE WHEN job.attempts < job.max_attempts AND NOT job.cancel_requested THEN NULL "
                "              ELSE expired.worker END) "
                "FROM expired WHERE job.id = expired.id RETURNING job.id, job.state",
                (LEASE_EXPIRED, now()),
            ).fetchall()
            for job_id, _ in rows:
                self._notify(conn, job_id)
        for job_id, state in rows:
            logger.warning("job %s: its worker's lease expired; now %s", job_id, state)
        return [tuple(row) for row in rows]


def lease_held(url: str, job_id: str, worker: str, attempt: int, *, margin_seconds: float) -> bool:
    """Whether this attempt still holds its job's lease with `margin_seconds` to spare: what a training
    process asks just before it publishes (a job that may be running elsewhere by then must not)."""
    with psycopg.connect(url, **SESSION) as conn:
        return (
            conn.execute(
                f"SELECT 1 FROM softprompt_jobs WHERE {PostgresQueue.HELD} "
                "AND lease_expires_at > now() + make_interval(secs => %s)",
                (job_id, worker, attempt, margin_seconds),
            ).fetchone()
            is not None
        )


def _record_json(record: JobRecord) -> dict:
    return json_safe(record.model_dump(mode="json"))
