"""`open_store`: the backend a location names (a folder, or a postgresql:// URL)."""

from __future__ import annotations

import os

from core.settings import is_database_url
from prompt_store.base import PromptStore
from prompt_store.errors import PromptStoreError


def open_store(location: str | os.PathLike) -> PromptStore:
    """The store at `location`: a `postgresql://` URL, or a folder (created if missing)."""
    text = os.fspath(location)
    if "://" in text and not is_database_url(text):
        raise PromptStoreError(
            f"unsupported store URL {text.split('://')[0]}://...: use a folder or a postgresql:// URL"
        )
    if is_database_url(text):
        from prompt_store.postgres import PostgresStore  # psycopg is only needed for this backend

        return PostgresStore(text)
    from prompt_store.folder import FolderStore

    return FolderStore(text)
