"""Errors of the job layer (mapped to HTTP status codes in server/http/errors.py)."""

from trainer.data import DataError


class JobError(Exception):
    code = "job_error"


class JobNotFoundError(JobError, LookupError):
    code = "job_not_found"

    def __init__(self, job_id: str, kind: str = "train"):
        self.job_id = job_id
        what, listing = ("evaluation job", "/eval") if kind == "eval" else ("training job", "/train")
        super().__init__(f"No {what} with id {job_id!r}; GET {listing} lists them.")


class JobStateError(JobError):
    """The job is not in a state that allows the action (e.g. cancelling a finished job)."""

    code = "job_state_conflict"


class UploadTooLargeError(JobError):
    code = "upload_too_large"

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"The upload exceeds the limit of {limit} bytes (SOFTPROMPT_MAX_UPLOAD_BYTES).")


class InvalidEvalRequestError(Exception):
    """A /eval request lacks its data or references, or a setting is out of range."""

    code = "invalid_eval_request"


class InvalidEvalDataError(DataError):
    """A line of the labeled data sent to /eval is malformed; the message names the line."""
