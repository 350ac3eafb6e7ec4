"""Versioned, immutable store of soft prompts saved as PEFT prompt-tuning adapters."""

import core  # noqa: F401  (first: it sets how torch's threads wait, before torch loads)
from core.fingerprint import ModelFingerprint
from prompt_store.base import PromptStore
from prompt_store.errors import (
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
from prompt_store.folder import FolderStore
from prompt_store.names import VersionId, parse_ref, validate_name
from prompt_store.open import open_store
from prompt_store.version import LoadedPrompt, PromptVersion

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
