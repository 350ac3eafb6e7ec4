"""Resolve prompt references and keep loaded prompt tensors in a size-bounded LRU.

Resolution (`math`, `math-v3`, an alias) asks the store every time, so a newly published
version or a moved alias is seen at once; the tensor load (checksum + validation) happens
once per version (keyed by name, version and checksum) and is checked against the model.
When the store cannot be reached (its database is away), a reference resolved before is
served with the version it resolved to last, if that one is still loaded: prompts already in
use keep answering through an outage, anything else gets the store's 503.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from prompt_store import LoadedPrompt, ModelFingerprint, PromptStore, PromptVersion, StoreUnavailableError


class PromptCache:
    def __init__(self, store: PromptStore, fingerprint: ModelFingerprint, max_entries: int):
        self.store, self.fingerprint, self.max_entries = store, fingerprint, max_entries
        self._items: OrderedDict[tuple, LoadedPrompt] = OrderedDict()
        self._resolved: OrderedDict[str, tuple] = OrderedDict()  # reference -> the key it resolved to last
        self._lock = threading.Lock()
        self.stale_resolutions = 0  # answers given from `_resolved` while the store was away
        self.loads = 0
        self.load_failures = 0
        self.hits = 0

    def get(self, ref: str) -> LoadedPrompt:
        """Resolve `ref` and return its loaded tensor (PromptNotFoundError, IncompatibleModelError...)."""
        try:
            version = self.store.resolve(ref)
        except StoreUnavailableError:
            with self._lock:
                loaded = self._items.get(self._resolved.get(ref))
                if loaded is None:
                    raise
                self.stale_resolutions += 1
                return loaded
        loaded = self.get_version(version)
        with self._lock:
            self._resolved[ref] = loaded.cache_key
            self._resolved.move_to_end(ref)
            while len(self._resolved) > 4 * self.max_entries:
                self._resolved.popitem(last=False)
        return loaded

    def get_version(self, version: PromptVersion) -> LoadedPrompt:
        key = (version.id.name, version.id.version, version.checksum)
        with self._lock:
            loaded = self._items.get(key)
            if loaded is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return loaded
        try:
            loaded = self.store.load(version, expect=self.fingerprint)  # checks compatibility before reading
        except Exception:
            with self._lock:
                self.load_failures += 1
            raise
        with self._lock:
            self.loads += 1
            self._items[key] = loaded
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return loaded

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._items

    def evict_prompt(self, name: str, version: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == name and (version is None or k[1] == version)]:
                del self._items[key]

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._items),
                "max_entries": self.max_entries,
                "loads": self.loads,
                "load_failures": self.load_failures,
                "hits": self.hits,
                "stale_resolutions": self.stale_resolutions,
            }
