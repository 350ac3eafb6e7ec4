"""Evaluation jobs, wherever they run: the request checked up front, and the comparison body.

`build_eval_request` refuses a bad request before any job exists (malformed data: 422 with the
line; an unknown prompt: 404; a prompt made for another model: 409). `score_eval_job` runs a
queued job given a scorer: the serving engine's (server/services/evaluation.py) or the model in
a job process of its own (jobs/process.py), with the same task, length and recording rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.modeling import FrozenModel
from jobs.errors import InvalidEvalDataError, InvalidEvalRequestError
from jobs.files import EVAL_DATA, REQUEST
from jobs.submission import check_size
from prompt_store import PromptStore
from trainer.compare import (
    ComparisonCancelled,
    ReferenceSpec,
    TaskHint,
    choose_max_new_tokens,
    choose_task,
    data_identity,
    load_references,
    record_results,
    reference_specs,
    run_comparison,
)
from trainer.config import TASKS
from trainer.data import DataError, jsonl_lines, parse_examples
from trainer.evaluate import Task

logger = logging.getLogger(__name__)

MAX_EVAL_NEW_TOKENS = 256
CHUNK_SIZE = 8  # examples in flight at once: queue places taken, or one label-scoring batch


@dataclass
class EvalRequest:
    request: dict  # what the job folder's request.json holds
    data: bytes
    num_examples: int

    def sha256(self) -> str:
        digest = hashlib.sha256(json.dumps(self.request, sort_keys=True).encode())
        digest.update(b"\0" + hashlib.sha256(self.data).digest())
        return digest.hexdigest()


def build_eval_request(
    *,
    data: bytes,
    data_name: str,
    prompts: list,
    texts: list,
    bare: bool,
    task: str | None,
    max_new_tokens,
    size_limit: int,
    store: PromptStore,
    frozen: FrozenModel | None,
    max_new_tokens_limit: int = MAX_EVAL_NEW_TOKENS,
) -> EvalRequest:
    """Check the data (every line), the references (each prompt resolves and fits the model) and the settings."""
    check_size(data, size_limit)
    task = task or "auto"
    if task not in TASKS:
        raise InvalidEvalRequestError(f"'task' must be one of {', '.join(TASKS)}, got {task!r}.")
    max_new_tokens = _max_new_tokens(max_new_tokens, min(MAX_EVAL_NEW_TOKENS, max_new_tokens_limit))
    if any("\x00" in text for text in texts if isinstance(text, str)):
        raise InvalidEvalRequestError("A 'text' prompt holds a NUL character (\\u0000); send plain text.")
    try:
        specs = reference_specs(prompts, texts, bare)
    except ValueError as error:
        raise InvalidEvalRequestError(f"{error}.") from None
    try:
        examples = parse_examples(jsonl_lines(data.decode("utf-8")), source=data_name)
    except UnicodeDecodeError as error:
        raise InvalidEvalDataError(f"{data_name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except DataError as error:
        raise InvalidEvalDataError(str(error)) from None
    hints = []
    for spec in specs:  # unknown (404) or made for another model (409): refused now, not in the job
        if spec.kind == "prompt":
            version = store.resolve(spec.value)
            if frozen is not None:
                store.check_compatible(version, frozen.fingerprint)
            hints.append(TaskHint.from_meta(version.meta))
    try:  # the job makes the same choice with the same hints
        choose_task(hints, examples, task)
    except ValueError as error:
        raise InvalidEvalRequestError(f"{error}.") from None
    request = {
        "references": [{"kind": s.kind, "value": s.value} for s in specs],
        "task": task,
        "max_new_tokens": max_new_tokens,
        "data": data_identity(data, data_name, len(examples)),
    }
    return EvalRequest(request, data, len(examples))


def _max_new_tokens(value, limit: int) -> int | None:
    """A form's digits or a JSON integer in 1..`limit`; None when not given."""
    if value in ("", None):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise InvalidEvalRequestError(
            f"'max_new_tokens' must be an integer from 1 to {limit} on this server, got {value!r}."
        )
    return value


def score_eval_job(
    folder: Path,
    frozen: FrozenModel,
    store: PromptStore,
    emit,
    should_stop,
    *,
    limit: int,
    chunk_size: int,
    scorer: Callable[[Task, int], Callable],
    before_recording: Callable[[dict], None] = lambda table: None,
) -> dict | None:
    """An evaluation job's comparison, wherever it runs: read request.json and the data in `folder`,
    score every reference with `scorer(task, max_new_tokens)`, reporting `started` and `progress`
    through `emit`; `before_recording(table)` runs before the scores are recorded with their
    versions. Returns the table, or None when the job was cancelled (`cancelled` emitted)."""
    request = json.loads((folder / REQUEST).read_text())
    examples = parse_examples(
        jsonl_lines((folder / EVAL_DATA).read_text(encoding="utf-8")), source=request["data"]["name"]
    )
    references = load_references(frozen, store, [ReferenceSpec(r["kind"], r["value"]) for r in request["references"]])
    hints = [r.hint for r in references]
    task = choose_task(hints, examples, request["task"])
    max_new_tokens = choose_max_new_tokens(hints, request["max_new_tokens"], limit=limit)
    score = scorer(task, max_new_tokens)
    emit("started", num_train_examples=0, num_eval_examples=len(examples))

    def progress(p):
        emit(
            "progress",
            step=p.done,
            total=p.total,
            loss=None,
            val_metric=None,
            eta_seconds=p.eta_seconds,
            elapsed_seconds=p.elapsed_seconds,
        )

    try:
        table = run_comparison(
            score,
            references,
            examples,
            task,
            data=request["data"],
            max_new_tokens=max_new_tokens,
            chunk_size=chunk_size,
            on_progress=progress,
            should_stop=should_stop,
        )
    except ComparisonCancelled:
        emit("cancelled")
        return None
    if should_stop():  # a cancel that came with the last batch: nothing is kept
        emit("cancelled")
        return None
    before_recording(table)
    job_id = request.get("job_id", folder.name)
    recorded = record_results(store, table, source=f"eval job {job_id}")
    logger.info(
        "eval job %s: %s; recorded with %s",
        job_id,
        ", ".join(f"{r['reference']} {r['score']:.3f}" for r in table["results"]),
        ", ".join(recorded) or "no version",
    )
    return table


def summary(table: dict) -> dict:
    """The table without its per-example rows (what job listings carry)."""
    return {k: v for k, v in table.items() if k != "examples"}
