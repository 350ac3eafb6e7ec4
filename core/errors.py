"""Errors of the store's database, raised by core/database.py and core/schema.py.

They share their base with every other store error (`prompt_store.errors` re-exports them), so a
caller that handles store errors handles a database that is away the same way.
"""

from __future__ import annotations


class PromptStoreError(Exception):
    """Base class of every error the store raises."""

    code = "prompt_store_error"


class StoreUnavailableError(PromptStoreError):
    """The store cannot be reached now (its database is down or unreachable): retry later."""

    code = "store_unavailable"


class UnstorableValueError(PromptStoreError, ValueError):
    """A value the store cannot hold (a NUL character in a text, a number out of range): the
    request is refused, nothing is written."""

    code = "invalid_value"


class SchemaVersionError(PromptStoreError):
    """The database's schema is newer than this softprompt knows: upgrade softprompt."""

    code = "store_schema_too_new"
