"""Errors of the generation engine (no HTTP here: server/errors.py maps them to statuses)."""

from __future__ import annotations


class EngineError(Exception):
    code = "engine_error"


class QueueFullError(EngineError):
    """Too many requests are waiting for a batch slot."""

    code = "queue_full"

    def __init__(self, waiting: int, limit: int, retry_after: int = 1):
        self.waiting, self.limit, self.retry_after = waiting, limit, retry_after
        super().__init__(f"{waiting} requests are already waiting (limit {limit}); retry shortly.")


class InputTooLongError(EngineError):
    """The prompt plus the requested new tokens do not fit the model's context."""

    code = "input_too_long"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, limit: int):
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit
        super().__init__(
            f"The input takes {prompt_tokens} tokens (soft prompt and template included) and asks for "
            f"{max_new_tokens} new ones; the model's context holds {limit}."
        )


class InvalidGenerationRequestError(EngineError, ValueError):
    """A request the engine cannot serve as given (e.g. messages without a user turn)."""

    code = "invalid_request"


class EngineNotReadyError(EngineError):
    """The model is still loading, or the engine stopped."""

    code = "not_ready"


class SamplingError(EngineError):
    """Choosing one request's next token failed (e.g. the model produced NaN logits)."""

    code = "sampling_failed"


class ShuttingDownError(EngineNotReadyError):
    """The engine stopped before the request finished."""

    code = "shutting_down"
