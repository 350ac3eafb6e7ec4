"""The persisted state of one training job."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum

from pydantic import BaseModel, Field


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


JOB_KINDS = ("train", "eval")


class JobRecord(BaseModel):
    id: str
    kind: str = Field("train", description="train (publishes a prompt) or eval (scores references on labeled data)")
    name: str | None = Field(None, description="training: the prompt name the result is published under")
    state: JobState = JobState.queued
    step: int = 0
    total: int = 0
    loss: float | None = None
    val_metric: float | None = Field(None, description="latest validation metric (accuracy or exact match)")
    eta_seconds: float | None = None
    elapsed_seconds: float | None = None
    version: str | None = Field(None, description="the published name-vN, once succeeded")
    error: str | None = None
    metrics: dict = Field(
        default_factory=dict, description="training: the run's metrics; eval: the table without per-example rows"
    )
    config: dict = Field(default_factory=dict, description="the training settings")
    num_train_examples: int = 0
    num_eval_examples: int = 0
    worker: str | None = Field(None, description="with a database store: the worker holding the running job's lease")
    attempts: int = Field(0, description="with a database store: times a worker took the job")
    processes: int = Field(1, description="training: processes (torchrun ranks) the job runs on")
    created_at: str = Field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    history: list[dict] = Field(default_factory=list, description="step, loss, val_metric per step")
    revision: int = Field(0, description="increases on every change (for event streams)")
    idempotency_key: str | None = Field(None, description="the Idempotency-Key the job was submitted with")
    request_sha256: str | None = Field(None, description="what the key answered: name, settings and data, hashed")


def training_request(
    record: JobRecord, *, model: str, device: str | None, threads: int, fingerprint: dict | None
) -> dict:
    """What a training worker reads besides the data (request.json). Not the store: a database
    URL carries a password, so the worker gets it through its environment."""
    return {
        "name": record.name,
        "config": {**record.config, "threads": threads},
        "model": model,
        "device": device,
        "fingerprint": fingerprint,
    }
