"""The job system's settings (SOFTPROMPT_* variables): what a worker runs and how it holds its jobs.

The server's `Settings` extends these; `softprompt worker` reads them alone.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from core.settings import CommonSettings
from jobs.limits import machine_cores

JOB_KINDS = ("train", "eval")


def worker_kinds(value: str) -> list[str]:
    """'train,eval' -> ['train', 'eval']; 'none' or '' -> []."""
    kinds = [kind.strip().lower() for kind in value.split(",") if kind.strip()]
    return [] if kinds == ["none"] else kinds


class JobSettings(CommonSettings):
    device: str | None = Field(None, description="'cpu' or 'cuda' (default: cuda when available)")
    train_threads: int = Field(1, ge=1, description="torch threads a training job may use")
    max_train_steps: int = Field(
        100_000, ge=1, le=1_000_000, description="most steps a training job submitted over HTTP may ask for"
    )
    max_train_processes: int = Field(
        default_factory=machine_cores,
        ge=1,
        le=64,
        description="most processes (torchrun "
        "ranks) one training job may ask for (default: this machine's cores); a worker "
        "takes only jobs that fit its own cores",
    )
    train_concurrency: int = Field(
        1, ge=1, description="jobs this server's worker (or `softprompt worker`) runs at once (the rest wait, FIFO)"
    )
    worker_jobs: str = Field(
        "train,eval",
        description="with a database store: the jobs this server's embedded "
        "worker takes ('train,eval', 'eval', 'train' or 'none' for a serving-only replica whose "
        "jobs run on other servers or `softprompt worker` processes)",
    )
    job_lease_seconds: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="with a database store: a worker's hold on a "
        "running job; a worker silent this long loses the job (failed, or queued again "
        "while SOFTPROMPT_JOB_MAX_ATTEMPTS allows)",
    )
    job_heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="how often workers renew their leases and reap expired ones (at most half the lease)",
    )
    job_max_attempts: int = Field(
        1,
        ge=1,
        le=100,
        description="times a job is tried when its worker dies or stops (1: it fails instead of running again)",
    )

    @field_validator("worker_jobs")
    @classmethod
    def _known_job_kinds(cls, value: str) -> str:
        unknown = [kind for kind in worker_kinds(value) if kind not in JOB_KINDS]
        if unknown:
            raise ValueError(
                f"SOFTPROMPT_WORKER_JOBS: unknown job kind {unknown[0]!r}; use 'train', 'eval', 'train,eval' or 'none'"
            )
        return value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> JobSettings:
        if self.job_heartbeat_seconds * 2 > self.job_lease_seconds:
            raise ValueError(
                f"SOFTPROMPT_JOB_HEARTBEAT_SECONDS ({self.job_heartbeat_seconds}) must be at most half of "
                f"SOFTPROMPT_JOB_LEASE_SECONDS ({self.job_lease_seconds})"
            )
        return self

    @property
    def worker_kinds(self) -> list[str]:
        return worker_kinds(self.worker_jobs)
