"""Labeled examples from JSONL: one `{"input": ..., "output": ...}` object per line.

An optional `"split"` field (`"train"` or `"validation"`) fixes which examples are used for
model selection; otherwise `split_examples` carves a deterministic, seeded validation split.
Other fields (e.g. `movie`) are ignored.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.untrusted import is_text, parse_json

SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation"}


class DataError(ValueError):
    """A training file is unusable; the message names the source and the 1-based line."""


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    split: str | None = None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on line feeds only.

    str.splitlines also breaks at U+2028, U+2029, U+0085 and other separators, which a JSON string
    may hold raw (real reviews do), so it would cut such a record in two."""
    return text.split("\n")


def parse_examples(lines: Iterable[str], source: str = "<upload>") -> list[Example]:
    """Parse JSONL lines into Examples; blank lines are skipped, anything malformed is refused."""
    examples = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        line = raw.strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        try:
            record = parse_json(line)
        except ValueError as error:
            raise DataError(f"{where}: {error}") from None
        if not isinstance(record, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"input": "...", "output": "..."}}, got {type(record).__name__}'
            )
        for key in ("input", "output"):
            if key not in record:
                raise DataError(f"{where}: missing field {key!r}")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
            if not is_text(record[key]):
                raise DataError(
                    f"{where}: field {key!r} is not valid Unicode text (it holds a lone surrogate escape like \\ud800)"
                )
        if not record["output"].strip():
            raise DataError(f"{where}: field 'output' is empty")
        split = record.get("split")
        if split is not None:
            if not isinstance(split, str) or split.lower() not in _SPLIT_ALIASES:
                raise DataError(f"{where}: unknown split {split!r} (use 'train' or 'validation')")
            split = _SPLIT_ALIASES[split.lower()]
        examples.append(Example(record["input"], record["output"], split))
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """Read a JSONL file of examples (UTF-8)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return parse_examples(handle, source=str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation). Explicit `split` fields win; otherwise a seeded shuffle puts
    `eval_fraction` of the examples (at least one) in validation. Same inputs, same split."""
    if any(e.split is not None for e in examples):
        train = [e for e in examples if e.split in (None, "train")]
        val = [e for e in examples if e.split == "validation"]
        if not train or not val:
            raise DataError("with explicit 'split' fields, need at least one 'train' and one 'validation' example")
        return train, val
    if len(examples) < 2:
        raise DataError("need at least 2 examples to carve a validation split")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val
