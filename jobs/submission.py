"""Validate a training upload up front, so a bad one is refused before any job exists."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from jobs.errors import UploadTooLargeError
from jobs.limits import TrainingLimits
from prompt_store import validate_name
from trainer.config import TrainConfig, TrainConfigError
from trainer.data import DataError, Example, jsonl_lines, parse_examples, split_examples

MAX_PROCESSES = 64  # ranks one job may ask for (each loads the model)

# Form/JSON field -> TrainConfig field. Anything else in TrainConfig can be given in `config`.
FIELD_TO_CONFIG = {
    "init": "init_text",
    "steps": "steps",
    "lr": "lr",
    "min_cosine": "min_cosine",
    "eval_fraction": "eval_fraction",
    "task": "task",
    "max_new_tokens": "max_new_tokens",
}


@dataclass
class Submission:
    name: str
    config: TrainConfig
    train_data: bytes
    eval_data: bytes | None
    num_train: int
    num_eval: int
    processes: int = 1

    def sha256(self) -> str:
        """What makes two submissions the same request: name, settings, processes and both files' bytes."""
        identity = [self.name, self.config.to_dict()] + ([self.processes] if self.processes != 1 else [])
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        for data in (self.train_data, self.eval_data or b""):
            digest.update(b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()


def check_size(data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise UploadTooLargeError(limit)
    return data


def examples_to_jsonl(examples: list, source: str = "examples") -> bytes:
    """A JSON body's examples, stored as the same JSONL a file upload would be. ASCII escapes
    keep any text that is not valid Unicode storable, for parse_examples to name its line."""
    for index, example in enumerate(examples):
        if not isinstance(example, dict):
            raise DataError(
                f'{source}[{index}]: expected an object like {{"input": "...", "output": "..."}}, got '
                f"{type(example).__name__}"
            )
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


def build_submission(
    *,
    name: str,
    fields: dict,
    train_data: bytes,
    eval_data: bytes | None,
    size_limit: int,
    source: str = "file",
    limits: TrainingLimits | None = None,
) -> Submission:
    """Check name, settings and every line of the data; raise the domain error that names the problem.

    `fields` holds init/steps/lr/min_cosine/eval_fraction/task/max_new_tokens (typed, or strings from a
    form) and optionally `config`, a dict of further TrainConfig settings.
    """
    validate_name(name)
    check_size(train_data, size_limit)
    if eval_data is not None:
        check_size(eval_data, size_limit)
    config_fields = fields.get("config")
    if config_fields is not None and not isinstance(config_fields, dict):
        raise TrainConfigError(
            "config", f"must be a JSON object of training settings, got {type(config_fields).__name__}"
        )
    settings = dict(config_fields or {})
    for field, target in FIELD_TO_CONFIG.items():
        if fields.get(field) not in (None, ""):
            settings[target] = fields[field]
    typed = _typed(settings)
    try:
        config = TrainConfig.from_dict(typed)
    except TrainConfigError as exc:  # past what any machine runs is past this server's bound too: name that one
        if limits is not None:
            limits.check_value(exc.field, typed.get(exc.field))
        raise
    processes = _processes(fields.get("processes"), config)
    if limits is not None:
        limits.check(config, processes)
    train = parse_examples(_text_lines(train_data, source), source=source)
    if eval_data is not None:
        val: list[Example] = parse_examples(_text_lines(eval_data, "eval_file"), source="eval_file")
    else:
        train, val = split_examples(train, config.eval_fraction, config.seed)
    return Submission(name, config, train_data, eval_data, len(train), len(val), processes)


def _processes(value, config: TrainConfig) -> int:
    """How many processes (torchrun ranks) share the job's batches: 1 to MAX_PROCESSES, at most the batch size."""
    if value in (None, ""):
        return 1
    try:
        processes = int(value)
    except (TypeError, ValueError):
        raise TrainConfigError(
            "processes", f"must be a whole number from 1 to {MAX_PROCESSES}, got {value!r}"
        ) from None
    if isinstance(value, (bool, float)) or not 1 <= processes <= MAX_PROCESSES:
        raise TrainConfigError("processes", f"must be a whole number from 1 to {MAX_PROCESSES}, got {value!r}")
    if processes > config.batch_size:
        raise TrainConfigError(
            "processes",
            f"{processes} processes cannot share batches of {config.batch_size} "
            "examples; use at most batch_size processes",
        )
    return processes


def _text_lines(data: bytes, source: str) -> list[str]:
    try:
        return jsonl_lines(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _typed(settings: dict) -> dict:
    """Form fields arrive as strings: turn numeric-looking ones into numbers for TrainConfig."""
    typed = {}
    for key, value in settings.items():
        if isinstance(value, str) and key not in ("init_text", "task"):
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    pass
        typed[key] = value
    return typed
