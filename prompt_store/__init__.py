"""Versioned, immutable store of soft prompts saved as PEFT prompt-tuning adapters."""

from .openmp import set_wait_policy

set_wait_policy()  # before torch loads (openmp.py says why)

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
    SchemaVersionError,
    StoreUnavailableError,
    UnstorableValueError,
)
from .fingerprint import ModelFingerprint
from .names import VersionId, parse_ref, validate_name
from .base import PromptStore, open_store
from .folder import FolderStore
from .version import LoadedPrompt, PromptVersion

__all__ = [
    "AliasInUseError",
    "ChecksumMismatchError",
    "FolderStore",
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
    "SchemaVersionError",
    "StoreUnavailableError",
    "UnstorableValueError",
    "VersionId",
    "open_store",
    "parse_ref",
    "validate_name",
]
