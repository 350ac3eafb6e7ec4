"""Jobs: a training or evaluation request -> a queue (folder or PostgreSQL) -> a worker -> a
process running the trainer -> a published version (docs/architecture.md, "the life of a job")."""

from jobs.errors import JobError, JobNotFoundError, JobStateError
from jobs.records import JobRecord, JobState
from jobs.service import JobService

__all__ = ["JobError", "JobNotFoundError", "JobRecord", "JobService", "JobState", "JobStateError"]
