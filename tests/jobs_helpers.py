"""Shared set-up for job tests: a tiny model saved as a folder the worker process can load."""

from __future__ import annotations

import json
import time

SENTIMENT = [
    {"input": "The movie was great fun, a wonderful film.", "output": "positive"},
    {"input": "The plot was dull and boring, a bad movie.", "output": "negative"},
    {"input": "A wonderful film.", "output": "positive"},
    {"input": "Dull and boring.", "output": "negative"},
    {"input": "Great fun.", "output": "positive"},
    {"input": "A bad movie.", "output": "negative"},
]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def save_tiny_model(frozen, folder):
    frozen.model.save_pretrained(folder)
    frozen.tokenizer.save_pretrained(folder)
    return str(folder)


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def job_service(store, jobs_dir, model: str, **settings):
    """A JobService (queue and embedded worker) as the server builds it from its settings."""
    from jobs.service import JobService
    from jobs.settings import JobSettings

    return JobService.from_settings(
        JobSettings(store=str(store), jobs_dir=jobs_dir, model=model, device="cpu", **settings)
    )


def running_process(service, job_id: str):
    """The process a service's worker runs the job in (None before it started)."""
    return next((job.proc for job in service.worker._jobs() if job.record.id == job_id), None)
