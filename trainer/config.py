"""Training configuration for EmbedGrad runs, validated when it is built."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from core.untrusted import is_text
from trainer.trust_region import PROJECTIONS

TASKS = ("auto", "classification", "generation")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
# Upper bounds on any machine (a server bounds its jobs further by what it can run: server/jobs/limits.py).
MAX_INIT_CHARS = 4000  # the init text becomes one vector per token
UPPER_BOUNDS = {
    "steps": 1_000_000,
    "warmup_steps": 1_000_000,
    "eval_every": 1_000_000,
    "patience": 1_000_000,
    "batch_size": 4096,
    "eval_batch_size": 4096,
    "grad_accum": 4096,
    "max_new_tokens": 4096,
    "max_input_tokens": 131_072,
    "threads": 1024,
    "max_eval_examples": 10_000_000,
}


class TrainConfigError(ValueError):
    """A training setting is out of range; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved with the published prompt)."""

    init_text: str
    steps: int = 200
    lr: float = 3e-3
    min_cosine: float = 0.95  # trust region: per-vector cosine to its initial vector
    projection: str = "nearest"  # how a vector outside it is brought back: "nearest" | "keep_norm"
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    eval_fraction: float = 0.1  # used when no explicit validation split
    eval_every: int = 25
    patience: int | None = None  # early stopping in evaluations without improvement
    seed: int = 0
    task: str = "auto"  # "auto" | "classification" | "generation"
    max_new_tokens: int | None = None  # generation: tokens generated when scoring (None: fit the longest target)
    threads: int | None = None  # torch.set_num_threads for the run
    weight_decay: float = 0.0  # AdamW decay; 0 keeps the vectors' norms where the text put them
    min_lr_ratio: float = 0.1  # cosine decay after warm-up ends at lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # gradient clipping on the prompt matrix (None: off)
    max_input_tokens: int = 512  # longer inputs keep their END (where the question usually is)
    eval_batch_size: int = 16
    max_eval_examples: int | None = None  # cap on validation examples per evaluation (None: all)
    use_chat_template: bool | None = None  # None: use it when the tokenizer has one

    def __post_init__(self) -> None:
        if not isinstance(self.init_text, str) or not self.init_text.strip():
            raise TrainConfigError("init_text", "must be a non-empty text (its token embeddings start the prompt)")
        if not is_text(self.init_text):
            raise TrainConfigError(
                "init_text", "is not valid Unicode text (it holds a lone surrogate escape like \\ud800)"
            )
        if "\x00" in self.init_text:
            raise TrainConfigError("init_text", "holds a NUL character (\\u0000); send plain text")
        if len(self.init_text) > MAX_INIT_CHARS:
            raise TrainConfigError(
                "init_text",
                f"is {len(self.init_text)} characters; the limit is {MAX_INIT_CHARS} (each "
                "token becomes one prompt vector)",
            )
        _positive_int(self, "steps", "batch_size", "grad_accum", "eval_every", "max_input_tokens", "eval_batch_size")
        _non_negative_int(self, "warmup_steps", "seed")
        if self.seed > MAX_SEED:
            raise TrainConfigError("seed", f"must be at most 2**64 - 1, got {self.seed!r}")
        _number(self, "lr", "in (0, 10]", lambda x: 0 < x <= 10)
        _number(self, "min_cosine", "in [-1, 1)", lambda x: -1 <= x < 1)
        _number(self, "eval_fraction", "in (0, 1)", lambda x: 0 < x < 1)
        _number(self, "weight_decay", ">= 0", lambda x: x >= 0)
        _number(self, "min_lr_ratio", "in [0, 1]", lambda x: 0 <= x <= 1)
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", "> 0, or null for no clipping", lambda x: x > 0)
        for name in ("patience", "threads", "max_eval_examples", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TrainConfigError(name, f"must be a positive integer or None, got {value!r}")
        if self.use_chat_template is not None and not isinstance(self.use_chat_template, bool):
            raise TrainConfigError(
                "use_chat_template", f"must be true, false or null (auto), got {self.use_chat_template!r}"
            )
        if not isinstance(self.projection, str) or self.projection not in PROJECTIONS:
            raise TrainConfigError("projection", f"must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise TrainConfigError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name, limit in UPPER_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise TrainConfigError(name, f"must be at most {limit:,}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict (e.g. a JSON request), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(known))})")
        return cls(**data)


def _positive_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainConfigError(name, f"must be a positive integer, got {value!r}")


def _number(config: TrainConfig, name: str, rule: str, ok: Callable[[float], bool]) -> None:
    """The field must be a finite real number (bools are not numbers) for which `ok` holds."""
    value = getattr(config, name)
    number = _finite(value)
    if number is None or not ok(number):
        raise TrainConfigError(name, f"must be a finite number {rule}, got {value!r}")


def _finite(value) -> float | None:
    """`value` as a float; None for non-numbers, bools, NaN, infinities and ints too big for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _non_negative_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrainConfigError(name, f"must be a non-negative integer, got {value!r}")
