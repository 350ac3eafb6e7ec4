"""`softprompt worker`: run training and evaluation jobs from the shared database on this machine.

    SOFTPROMPT_STORE=postgresql://... SOFTPROMPT_MODEL=default softprompt worker --concurrency 1 --threads 4

Jobs submitted to any server of a PostgreSQL store wait in its database; this process claims
them (each exactly once, under a lease it renews), trains each in its own process (through
torchrun when the job asks for several) and publishes the result into the same store, where
every server picks it up. It needs nothing but the database URL and the servers' model. On
SIGTERM or Ctrl-C it stops its jobs and hands them back (queued again while
SOFTPROMPT_JOB_MAX_ATTEMPTS allows, else failed); killed outright, its leases expire and any
live server or worker ends its jobs within a lease and a heartbeat.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

logger = logging.getLogger("softprompt.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="the store's postgresql:// URL (overrides SOFTPROMPT_STORE)")
    parser.add_argument("--model", default=None, help="model spec, the servers' (overrides SOFTPROMPT_MODEL)")
    parser.add_argument("--device", default=None, help="cpu or cuda (overrides SOFTPROMPT_DEVICE)")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="jobs run at once (overrides SOFTPROMPT_TRAIN_CONCURRENCY)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per training process (overrides SOFTPROMPT_TRAIN_THREADS)",
    )
    parser.add_argument(
        "--jobs",
        default="train,eval",
        help="the kinds of job to take: train, eval or train,eval "
        "(default; an evaluation loads the model in its own process, like `softprompt eval`)",
    )
    parser.add_argument(
        "--jobs-dir",
        default=None,
        help="local folder for job logs and curves (overrides SOFTPROMPT_JOBS_DIR; default ./softprompt-jobs)",
    )


def run(args: argparse.Namespace) -> int:
    from core.settings import settings_from
    from jobs.settings import JobSettings
    from jobs.setup import build_worker, open_queue
    from prompt_store import PromptStoreError

    settings = settings_from(
        JobSettings,
        "worker",
        {
            "store": args.store,
            "model": args.model,
            "device": args.device,
            "train_concurrency": args.concurrency,
            "train_threads": args.threads,
            "jobs_dir": args.jobs_dir,
            "worker_jobs": args.jobs,
        },
    )
    if settings is None:
        return 2
    if not settings.worker_kinds:
        print("softprompt worker: --jobs names no kind of job to take; use train, eval or train,eval", file=sys.stderr)
        return 2
    if not settings.store_is_database:
        print(
            "softprompt worker: jobs are shared through a PostgreSQL store; set SOFTPROMPT_STORE (or --store) to its "
            "postgresql:// URL. With a folder store the server runs its own jobs.",
            file=sys.stderr,
        )
        return 2
    try:
        queue = open_queue(settings)
    except PromptStoreError as error:  # the database cannot be reached, or its schema is newer than this release
        print(f"softprompt worker: {error}", file=sys.stderr)
        return 1
    worker = build_worker(settings, queue, embedded=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    queue.start_listening()
    worker.start()
    logger.info(
        "worker %s: %s jobs from %s with model %s", worker.id, "/".join(worker.kinds), queue.location, settings.model
    )
    try:
        stop.wait()
    finally:
        logger.info("worker %s stopping: handing back its jobs", worker.id)
        worker.stop()
        queue.close()
    return 0
