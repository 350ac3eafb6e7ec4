"""Training configuration for EmbedGrad runs, validated when it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

TASKS = ("auto", "classification", "generation")


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
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    eval_fraction: float = 0.1  # used when no explicit validation split
    eval_every: int = 25
    patience: int | None = None  # early stopping in evaluations without improvement
    seed: int = 0
    task: str = "auto"  # "auto" | "classification" | "generation"
    max_new_tokens: int = 16  # for generation-task evaluation
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
        _positive_int(self, "steps", "batch_size", "grad_accum", "eval_every", "max_new_tokens", "max_input_tokens", "eval_batch_size")
        _non_negative_int(self, "warmup_steps", "seed")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr <= 10:
            raise TrainConfigError("lr", f"must be in (0, 10], got {self.lr!r}")
        if not isinstance(self.min_cosine, (int, float)) or not -1 <= self.min_cosine < 1:
            raise TrainConfigError("min_cosine", f"must be in [-1, 1), got {self.min_cosine!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 < self.eval_fraction < 1:
            raise TrainConfigError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction!r}")
        if self.weight_decay < 0:
            raise TrainConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise TrainConfigError("max_grad_norm", f"must be > 0 or None, got {self.max_grad_norm!r}")
        for name in ("patience", "threads", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TrainConfigError(name, f"must be a positive integer or None, got {value!r}")
        if self.task not in TASKS:
            raise TrainConfigError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
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


def _non_negative_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrainConfigError(name, f"must be a non-negative integer, got {value!r}")
