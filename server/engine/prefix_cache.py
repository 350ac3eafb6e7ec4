"""LRU cache of prefix key/values: template head + soft prompt, computed once per version.

Keys are `(prompt_key, head_hash)` where `prompt_key` is `LoadedPrompt.cache_key`
(name, version, checksum) or None for the bare model: never the name alone, so a new version
or a re-published name can never be served stale values. Bounded by bytes. The same LRU holds
whole inputs (prefill.py's input cache) with a size function of their own.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from server.engine import kv as kvops


def head_hash(head_ids: tuple[int, ...]) -> str:
    return hashlib.sha1(repr(tuple(head_ids)).encode()).hexdigest()[:16]


class PrefixCache:
    def __init__(self, max_bytes: int, size=kvops.nbytes):
        self.max_bytes, self.size = max_bytes, size  # size(value) -> bytes
        self._items: OrderedDict[tuple, kvops.KV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt_key: tuple | None, head_ids: tuple[int, ...]) -> tuple:
        return (prompt_key, head_hash(head_ids))

    def get(self, key: tuple) -> kvops.KV | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: tuple, value: kvops.KV) -> None:
        size = self.size(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self.size(self._items.pop(key))
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= self.size(old)

    def evict_prompt(self, name: str, version: int | None = None) -> int:
        """Drop entries of a deleted prompt (all its versions when `version` is None)."""
        with self._lock:
            doomed = [
                k
                for k in self._items
                if k[0] is not None and k[0][0] == name and (version is None or k[0][1] == version)
            ]
            for k in doomed:
                self._bytes -= self.size(self._items.pop(k))
            return len(doomed)

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
