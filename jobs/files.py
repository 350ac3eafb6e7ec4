"""Where jobs live on disk: `<store root>/jobs/<id>/` holds job.json, the uploaded data and
the worker's artifacts (curves). job.json is replaced atomically, so a crash never leaves
a half-written record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from core.atomic import replace_json_atomically
from core.settings import absolute
from jobs.records import JobRecord

logger = logging.getLogger(__name__)

RECORD = "job.json"
TRAIN_DATA = "train.jsonl"
EVAL_DATA = "eval.jsonl"
REQUEST = "request.json"
RESULT = "result.json"  # an evaluation's whole table, per-example rows included
CANCEL_FLAG = "cancel"


class JobFiles:
    def __init__(self, root: Path):
        self.root = Path(absolute(root))
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, record: JobRecord, request: dict, files: dict[str, bytes | None]) -> None:
        """Write everything a worker needs (`files`: name -> bytes, None skipped), then the
        record (last: its presence marks a job)."""
        folder = self.folder(record.id)
        folder.mkdir(parents=True)
        for name, data in files.items():
            if data is not None:
                (folder / name).write_bytes(data)
        (folder / REQUEST).write_text(json.dumps(request, indent=2))
        self.save(record)
        logger.info("job %s: stored upload and request in %s", record.id, folder)

    def save(self, record: JobRecord) -> None:
        replace_json_atomically(self.folder(record.id) / RECORD, record.model_dump(mode="json"))

    def load_request(self, job_id: str) -> dict:
        return json.loads((self.folder(job_id) / REQUEST).read_text())

    def save_result(self, job_id: str, result: dict) -> None:
        replace_json_atomically(self.folder(job_id) / RESULT, result)

    def load_result(self, job_id: str) -> dict | None:
        try:
            return json.loads((self.folder(job_id) / RESULT).read_text())
        except FileNotFoundError:
            return None

    def load_all(self) -> list[JobRecord]:
        records = []
        for path in self.root.glob(f"*/{RECORD}"):
            try:
                records.append(JobRecord.model_validate_json(path.read_text()))
            except ValueError:
                logger.warning("skipping unreadable job record %s", path)
        return sorted(records, key=lambda r: r.id)  # ids start with a timestamp
