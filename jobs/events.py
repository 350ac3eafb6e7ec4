"""How a job's reports change its record: a training worker's stdout lines and an
evaluation's `emit` calls are the same events, `{"event": name, ...fields}`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator

from jobs.records import JobRecord, JobState

logger = logging.getLogger(__name__)

FINAL_EVENTS = ("succeeded", "failed", "cancelled")


def fold_progress(record: JobRecord, kind: str | None, event: dict) -> bool:
    """Apply a `started` or `progress` event to `record`; False for any other event."""
    if kind == "started":
        record.num_train_examples = event["num_train_examples"]
        record.num_eval_examples = event["num_eval_examples"]
        return True
    if kind == "progress":
        for key in ("step", "total", "loss", "eta_seconds", "elapsed_seconds"):
            setattr(record, key, event.get(key))
        if event.get("val_metric") is not None:  # keep the latest evaluation between evaluations
            record.val_metric = event["val_metric"]
        if record.kind == "train":  # an evaluation's steps are chunks: no curve to draw
            record.history.append({k: event.get(k) for k in ("step", "loss", "val_metric", "elapsed_seconds")})
        return True
    return False


def fold_end(record: JobRecord, kind: str | None, event: dict) -> tuple[JobState, str | None] | None:
    """For an event that ends the job (`succeeded` sets the version and metrics): the state and
    error it ends with; None for any other event."""
    if kind == "succeeded":
        record.version, record.metrics = event.get("version"), event.get("metrics", {})
        return JobState.succeeded, None
    if kind == "failed":
        return JobState.failed, event.get("error")
    if kind == "cancelled":
        return JobState.cancelled, None
    return None


def read_events(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON events among a worker's output lines (anything else, e.g. a library's print, is skipped)."""
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            yield event
        else:
            logger.debug("ignoring a worker line that is not an event: %r", line[:200])
