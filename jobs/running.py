"""What a worker knows of each job it runs, and the name it signs its leases with."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from jobs.records import JobRecord, JobState


def worker_id() -> str:
    """Names the worker in job records and lease errors: host, process, and a nonce for restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass
class RunningJob:
    record: JobRecord  # record.attempts is this attempt's fencing token
    folder: Path
    threads: int  # CPU threads it holds (its processes' together)
    lease_deadline: float  # monotonic; past it without a renewal the job is stopped (its lease may be gone)
    proc: subprocess.Popen | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    final: tuple[JobState, str | None] | None = None
    table: dict | None = None  # an evaluation's result, kept with the job's end
    cancel_requested: bool = False
    kill_at: float | None = None  # a cancelled job that has not stopped by then is killed
    lost: bool = False  # the lease is gone: write nothing more for this job
    ended: bool = False  # its process is gone; the end is being recorded
    dirty: bool = False
    last_write: float = 0.0
    threads_per_process: int = 1

    @property
    def key(self) -> tuple[str, int]:
        return self.record.id, self.record.attempts

    def kill(self) -> None:
        self.stop_requested.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
