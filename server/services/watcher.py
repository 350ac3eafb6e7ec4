"""Hot swap: watch the store and pre-warm new versions (load the tensor, prefill its prefix).

Whoever publishes (the trainer, the CLI, the HTTP API, another replica), the watcher sees the
store's signature change and gets the newest version of every name and every alias target
ready, so the first request on it costs no more than a warm one. A folder store is polled
every `store_poll_seconds`; a PostgreSQL store wakes the watcher with NOTIFY as the change
commits (and is polled at the same interval should the notices be lost).
"""

from __future__ import annotations

import logging
import threading
import time

from prompt_store import IncompatibleModelError, PromptStore, PromptStoreError, PromptVersion, StoreUnavailableError
from server.engine import Engine, PrefixCache
from server.services.prompt_cache import PromptCache

logger = logging.getLogger(__name__)


class StoreWatcher:
    def __init__(
        self,
        store: PromptStore,
        prompts: PromptCache,
        engine: Engine,
        head_ids: tuple[int, ...],
        *,
        poll_seconds: float,
        limit: int,
    ):
        self.store, self.prompts, self.engine, self.head_ids = store, prompts, engine, head_ids
        self.poll_seconds, self.limit = poll_seconds, limit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature = None
        self.store_error: str | None = None  # why the last scan could not read the store (logged once per outage)
        self.scans = 0
        self.warmed: list[str] = []
        self.warmed_at: dict[str, float] = {}  # version -> when it became servable warm here (Unix time)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="softprompt-store-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
                if self.store_error is not None:
                    logger.info("the store answers again")
                self.store_error = None
            except StoreUnavailableError as exc:
                if self.store_error is None:
                    logger.warning("store scan failed: %s", exc)
                self.store_error = str(exc)
            except Exception:
                logger.exception("store scan failed")
            try:
                self.store.wait_for_change(self.poll_seconds, self._stop)
            except Exception:
                logger.exception("waiting for store changes failed")
                self._stop.wait(self.poll_seconds)

    def scan(self) -> None:
        """Pre-warm what changed since the last scan (cheap when nothing did)."""
        signature = self.store.signature()
        if signature == self._signature:
            return
        self.scans += 1
        by_name, aliases = self.store.catalog()
        live = {str(version.id): version for versions in by_name.values() for version in versions}
        targets: list[PromptVersion] = [versions[-1] for versions in by_name.values()]
        targets += [live[target] for target in aliases.values() if target in live]
        for version in targets[: self.limit]:
            self.warm(version)
        self._signature = signature  # only once everything was read: a failed scan is tried again

    def warm(self, version: PromptVersion, timeout: float = 120.0) -> bool:
        """Load `version` and compute its prefix KV now; False if it cannot be served here."""
        key = (version.id.name, version.id.version, version.checksum)
        if PrefixCache.key(key, self.head_ids) in self.engine.prefix_cache and key in self.prompts:
            return True
        try:
            loaded = self.prompts.get_version(version)
        except IncompatibleModelError as exc:
            logger.warning("not pre-warming %s: %s", version.id, exc)
            return False
        except StoreUnavailableError:
            raise
        except PromptStoreError as exc:
            logger.warning("cannot load %s: %s", version.id, exc)
            return False
        self.engine.prewarm(loaded.cache_key, loaded.embeddings, self.head_ids).result(timeout)
        self.warmed = self.warmed[-99:] + [str(version.id)]
        self.warmed_at = {v: self.warmed_at.get(v, time.time()) for v in self.warmed}
        logger.info("pre-warmed %s", version.id)
        return True
