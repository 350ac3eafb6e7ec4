"""What one training job submitted over HTTP may ask of this server's machine.

TrainConfig refuses what no machine can run (trainer/config.py); these bounds are this
server's: steps, processes and threads by its settings and cores, generated tokens by its
generation limit, the init text by the served tokenizer. A refusal is a 422 that names the
field, the limit and the setting that raises it, before any job exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from trainer.config import TrainConfig, TrainConfigError

MAX_BATCH_SIZE = 256  # examples a step (or an evaluation chunk) holds in memory at once
MAX_INIT_TOKENS = 512  # prompt vectors a job may start from


def machine_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class TrainingLimits:
    max_steps: int
    max_new_tokens: int
    max_processes: int
    max_threads: int
    count_tokens: Callable[[str], int] | None = None  # the served model's tokenizer, once it is loaded

    def check(self, config: TrainConfig, processes: int) -> None:
        """Raise TrainConfigError naming the first field over this server's limit."""
        values = {
            "steps": config.steps,
            "max_new_tokens": config.max_new_tokens or 0,
            "processes": processes,
            "threads": config.threads or 1,
            "batch_size": config.batch_size,
            "eval_batch_size": config.eval_batch_size,
        }
        for field, value in values.items():
            self.check_value(field, value)
        if self.count_tokens is not None:
            tokens = self.count_tokens(config.init_text)
            if tokens > MAX_INIT_TOKENS:
                raise TrainConfigError(
                    "init_text",
                    f"is {tokens} tokens; a prompt starts from at most {MAX_INIT_TOKENS} (one vector per token)",
                )

    def check_value(self, field: str, value) -> None:
        """Raise TrainConfigError if `field`'s whole-number `value` is over this server's bound for it
        (the message names the setting that raises the bound); other fields and values pass."""
        bounds = {
            "steps": (self.max_steps, "SOFTPROMPT_MAX_TRAIN_STEPS"),
            "max_new_tokens": (self.max_new_tokens, "SOFTPROMPT_MAX_NEW_TOKENS_LIMIT"),
            "processes": (self.max_processes, "SOFTPROMPT_MAX_TRAIN_PROCESSES"),
            "threads": (self.max_threads, "the machine's cores"),
            "batch_size": (MAX_BATCH_SIZE, None),
            "eval_batch_size": (MAX_BATCH_SIZE, None),
        }
        if field not in bounds or not isinstance(value, int) or isinstance(value, bool):
            return
        limit, source = bounds[field]
        if value > limit:
            where = f" ({source})" if source else ""
            raise TrainConfigError(field, f"must be at most {limit:,} on this server{where}, got {value!r}")
