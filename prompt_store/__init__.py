"""Versioned, immutable store of soft prompts saved as PEFT prompt-tuning adapters."""

import os

# Set before torch is imported: torch otherwise spin-waits and a busy neighbour on a small
# machine makes it many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ruff: noqa: E402

from .errors import (
    AliasInUseError,
    ChecksumMismatchError,
    IdempotencyKeyReusedError,
    IncompatibleModelError,
    InvalidAdapterError,
    InvalidNameError,
    InvalidPromptError,
    InvalidShapeError,
    NameConflictError,
    NonFiniteValuesError,
    PromptNotFoundError,
    PromptStoreError,
)
from .fingerprint import ModelFingerprint
from .names import VersionId, parse_ref, validate_name
from .store import PromptStore
from .version import LoadedPrompt, PromptVersion

__all__ = [
    "AliasInUseError",
    "ChecksumMismatchError",
    "IdempotencyKeyReusedError",
    "IncompatibleModelError",
    "InvalidAdapterError",
    "InvalidNameError",
    "InvalidPromptError",
    "InvalidShapeError",
    "LoadedPrompt",
    "ModelFingerprint",
    "NameConflictError",
    "NonFiniteValuesError",
    "PromptNotFoundError",
    "PromptStore",
    "PromptStoreError",
    "PromptVersion",
    "VersionId",
    "parse_ref",
    "validate_name",
]
