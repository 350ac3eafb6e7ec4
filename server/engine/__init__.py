"""Continuous-batching generation engine with a soft-prompt prefix KV cache."""

from server.engine.engine import Engine
from server.engine.errors import (
    EngineError,
    EngineNotReadyError,
    InputTooLongError,
    InvalidGenerationRequestError,
    QueueFullError,
)
from server.engine.prefix_cache import PrefixCache
from server.engine.sampling import SamplingParams
from server.engine.sequence import DoneEvent, Event, FailedEvent, GenerationRequest, TokenEvent

__all__ = [
    "DoneEvent",
    "Engine",
    "EngineError",
    "EngineNotReadyError",
    "Event",
    "FailedEvent",
    "InputTooLongError",
    "InvalidGenerationRequestError",
    "GenerationRequest",
    "PrefixCache",
    "QueueFullError",
    "SamplingParams",
    "TokenEvent",
]
