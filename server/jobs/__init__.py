"""Training jobs: uploaded data -> a worker process running the trainer -> a published version."""

from .errors import JobError, JobNotFoundError, JobStateError
from .manager import JobManager
from .records import JobRecord, JobState

__all__ = ["JobError", "JobManager", "JobNotFoundError", "JobRecord", "JobState", "JobStateError"]
