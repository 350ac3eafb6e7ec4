"""The one place settings become a job queue and a worker (for the server's embedded worker and
for `softprompt worker` alike)."""

from __future__ import annotations

from jobs.folder_queue import FolderQueue
from jobs.queue import JobQueue
from jobs.settings import JOB_KINDS, JobSettings
from jobs.worker import Worker


def open_queue(settings: JobSettings) -> JobQueue:
    """Jobs beside a folder store stay on this machine (`jobs_dir`); with a database store they
    live in the database, for every replica and worker."""
    if settings.store_is_database:
        from jobs.postgres_queue import PostgresQueue  # psycopg is only needed for this backend

        return PostgresQueue(settings.store)
    return FolderQueue(settings.jobs_dir)


def build_worker(settings: JobSettings, queue: JobQueue, *, embedded: bool) -> Worker | None:
    """The worker that runs `queue`'s jobs here, or None for a serving-only replica. A local queue
    has no other worker, so a server's embedded worker takes every kind of its jobs."""
    kinds = settings.worker_kinds if queue.shared or not embedded else list(JOB_KINDS)
    if not kinds:
        return None
    return Worker(
        queue,
        store=settings.store,
        model_spec=settings.model,
        device=settings.device,
        threads=settings.train_threads,
        concurrency=settings.train_concurrency,
        kinds=kinds,
        scratch_dir=settings.jobs_dir,
        lease_seconds=settings.job_lease_seconds,
        heartbeat_seconds=settings.job_heartbeat_seconds,
        max_processes=settings.max_train_processes,
    )
