"""Domain errors of the prompt store. Each failure has its own class so callers (the CLI,
the HTTP layer) can map it to a precise message or status code."""

from __future__ import annotations

# the base and the database's errors live in core, which raises them; they are store errors
from core.errors import PromptStoreError, SchemaVersionError, StoreUnavailableError, UnstorableValueError  # noqa: F401


class InvalidNameError(PromptStoreError, ValueError):
    """A prompt, version or alias name does not match the allowed pattern."""

    code = "invalid_name"


class PromptNotFoundError(PromptStoreError, LookupError):
    """No prompt, version or alias with this reference exists."""

    code = "prompt_not_found"

    def __init__(self, ref: str, close_matches: list[str] | None = None):
        self.ref = ref
        self.close_matches = close_matches or []
        hint = f" Did you mean: {', '.join(self.close_matches)}?" if self.close_matches else ""
        super().__init__(f"No prompt named {ref!r} in the store.{hint}")


class NameConflictError(PromptStoreError, ValueError):
    """A name is already used by a prompt where an alias is wanted, or the reverse."""

    code = "name_conflict"


class AliasInUseError(PromptStoreError):
    """Deleting a version that an alias points at, without force."""

    code = "alias_in_use"


class InvalidPromptError(PromptStoreError, ValueError):
    """The prompt tensor or its files are unusable (base of the validation errors)."""

    code = "invalid_prompt"


class ChecksumMismatchError(InvalidPromptError):
    """The tensor file does not match the checksum recorded when it was published."""

    code = "checksum_mismatch"


class InvalidShapeError(InvalidPromptError):
    """The prompt tensor is not a 2-D [num_virtual_tokens, hidden_size] matrix."""

    code = "invalid_shape"


class NonFiniteValuesError(InvalidPromptError):
    """The prompt tensor holds NaN or infinite values."""

    code = "non_finite_values"


class InvalidAdapterError(InvalidPromptError):
    """A folder or file to import is not a PEFT prompt-tuning adapter we can read."""

    code = "invalid_adapter"


class IncompatibleModelError(PromptStoreError):
    """The prompt was made for a model with another hidden size or embedding matrix."""

    code = "incompatible_model"


class IdempotencyKeyReusedError(PromptStoreError, ValueError):
    """An Idempotency-Key already answered a different request (another name, file or setting)."""

    code = "idempotency_key_reused"

    def __init__(self, key: str, first: str):
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different request ({first}); "
            "use a new key for a new request."
        )
