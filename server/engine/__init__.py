"""Continuous-batching generation engine with a soft-prompt prefix KV cache."""

from .errors import EngineError, EngineNotReadyError, InputTooLongError, InvalidGenerationRequestError, QueueFullError
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .scheduler import Engine
from .sequence import DoneEvent, Event, FailedEvent, GenerationRequest, TokenEvent

__all__ = [
    "DoneEvent", "Engine", "EngineError", "EngineNotReadyError", "Event", "FailedEvent", "InputTooLongError",
    "InvalidGenerationRequestError", "GenerationRequest", "PrefixCache", "QueueFullError", "SamplingParams", "TokenEvent",
]
