"""Everything the app serves with, built once in the lifespan (never at import time)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

import torch

from core.modeling import FrozenModel, load_frozen_model, resolve_spec
from core.models import ModelSpecError
from prompt_store import open_store
from server.engine import Engine, PrefixCache
from server.engine.prefill import input_cache
from server.engine.rewrites import ServingRewrites, prepare_for_serving
from server.services.generation import GenerationService
from server.services.metrics import RequestMetrics
from server.services.prompt_admin import PromptAdmin
from server.services.prompt_cache import PromptCache
from server.services.tenants import Tenants
from server.services.watcher import StoreWatcher
from server.settings import Settings

logger = logging.getLogger(__name__)


class AppState:
    """Holds the one model and the objects built around it; `ready` once they all exist."""

    def __init__(self, settings: Settings, *, metrics: RequestMetrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.tenants = Tenants(settings.client_key_map, settings.api_key, settings.key_limit_map)
        self.store = open_store(settings.store)
        collected = self.store.collect_garbage()
        if collected:
            logger.info("removed %d abandoned staging folders from %s", collected, self.store.location)
        self.started_at = time.time()
        self.model_loads = 0
        self.frozen: FrozenModel | None = None
        self.rewrites: ServingRewrites | None = None
        self.engine: Engine | None = None
        self.prompts: PromptCache | None = None
        self.generation: GenerationService | None = None
        self.admin: PromptAdmin | None = None
        self.watcher: StoreWatcher | None = None
        self.boot_error: str | None = None
        self.reserved_threads: Callable[[], int] | None = None  # threads training workers hold
        self._ready = threading.Event()
        self._closing = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.engine.alive

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def boot(
        self,
        frozen: FrozenModel | None = None,
        *,
        raise_errors: bool = True,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """Load the model (unless one is given), start the engine and the store watcher.

        A failure is kept in `boot_error` (shown by /ready); `raise_errors` also re-raises it, and
        `on_failure` is called (the server stops, so `softprompt serve` exits with the reason).
        """
        settings = self.settings
        try:
            if settings.threads:
                torch.set_num_threads(settings.threads)
            if frozen is None:
                frozen = load_frozen_model(settings.model, device=settings.device)
            if self._closing.is_set():
                logger.info("shutting down: not starting the engine")
                return
            self.model_loads += 1
            self.frozen = frozen
            self.rewrites = prepare_for_serving(
                frozen.model,
                fused_projections=settings.fused_projections,
                packed_weights=settings.packed_weights,
                gqa_attention=settings.gqa_attention,
                max_batch_size=settings.max_batch_size,
            )
            logger.info("model rewritten for serving: %s", self.rewrites)
            backend = llamacpp_backend(frozen, settings) if settings.engine == "llamacpp" else None
            self.engine = Engine(
                frozen,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                prefix_cache=PrefixCache(max_bytes=settings.prefix_cache_mb * 1024 * 1024),  # the torch backend's
                use_prefix_cache=settings.use_prefix_cache,
                input_cache=input_cache(settings.input_cache_mb * 1024 * 1024),
                retry_after=settings.queue_retry_after,
                batch_window_ms=settings.batch_window_ms,
                pack_prefills=settings.pack_prefills,
                reserved_threads=self.reserved_threads,
                flooding=self.tenants.flooding,
                flood_rows=settings.flood_rows,
                threads=settings.threads,
                scheduling=settings.scheduling,
                backend=backend,
            )
            self.prompts = PromptCache(self.store, frozen.fingerprint, settings.prompt_cache_size)
            self.generation = GenerationService(
                frozen,
                self.engine,
                self.prompts,
                max_new_tokens_limit=settings.max_new_tokens_limit,
                metrics=self.metrics,
                tenants=self.tenants,
            )
            self.engine.start()
            if settings.prewarm and settings.use_prefix_cache:
                self.watcher = StoreWatcher(
                    self.store,
                    self.prompts,
                    self.engine,
                    self.generation.default_head,
                    poll_seconds=settings.store_poll_seconds,
                    limit=settings.prompt_cache_size,
                )
                self.engine.prewarm(None, None, self.generation.default_head).result(120)  # the bare model's head
                self.watcher.scan()
                self.watcher.start()
            self.admin = PromptAdmin(
                self.store,
                frozen,
                self.prompts,
                self.engine.prefix_cache,  # the backend's: a deleted version's prefixes leave it
                self.watcher,
                max_upload_bytes=settings.max_prompt_upload_bytes,
            )
            # Everything built so far lives as long as the server: keep the cyclic GC from walking it
            # (a full pass over the model's objects stalled every thread for ~0.2 s under load).
            gc.collect()
            gc.freeze()
            self._ready.set()
            logger.info("ready: %s, store %s", frozen.base_model, self.store.location)
        except Exception as exc:
            self.boot_error = f"{type(exc).__name__}: {exc}"
            logger.exception("server failed to start")
            if on_failure is not None:
                on_failure()
            if raise_errors:
                raise

    def shutdown(self) -> None:
        self._closing.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self.engine is not None:
            self.engine.stop()
        if self.generation is not None:
            self.generation.close()
        self.store.close()

    def store_status(self) -> dict:
        """What /ready says of the store: a database that is away does not make the replica
        unready (prompts already loaded keep serving), but it is reported."""
        error = self.watcher.store_error if self.watcher is not None else None
        if error is None and not self.store.available:
            error = "the store's database cannot be reached"
        backend = "postgresql" if self.settings.store_is_database else "folder"
        return {"backend": backend, "location": self.store.location, "available": error is None, "error": error}

    def stats(self) -> dict:
        out = {
            "model_loads": self.model_loads,
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started_at, 1),
        }
        if self.frozen is not None:
            out["model"] = {
                "base_model": self.frozen.base_model,
                "hidden_size": self.frozen.fingerprint.hidden_size,
                "device": str(self.frozen.device),
                "dtype": str(self.frozen.dtype),
                "context_length": self.frozen.context_length,
                "load_seconds": round(self.frozen.load_seconds, 2),
                "rewrites": self.rewrites.as_dict() if self.rewrites else None,
            }
        if self.engine is not None:
            out["engine"] = self.engine.stats()
        if self.prompts is not None:
            out["prompt_cache"] = self.prompts.stats()
        if self.watcher is not None:
            recent = self.watcher.warmed[-20:]
            out["watcher"] = {
                "scans": self.watcher.scans,
                "warmed": recent,
                "warmed_at": {v: self.watcher.warmed_at[v] for v in recent if v in self.watcher.warmed_at},
                "poll_seconds": self.watcher.poll_seconds,
            }
        out["torch_threads"] = torch.get_num_threads()
        return out


def llamacpp_backend(frozen: FrozenModel, settings: Settings):
    """The llama.cpp backend on the GGUF file the model was loaded from (SOFTPROMPT_ENGINE=llamacpp)."""
    from server.engine.llamacpp_backend import LlamaCppBackend

    resolved = resolve_spec(settings.model)
    if resolved.gguf_file is None:
        raise ModelSpecError(
            f"SOFTPROMPT_ENGINE=llamacpp runs a GGUF file, and {settings.model!r} is a Hugging Face folder: "
            "give a .gguf model (or a named model), or use SOFTPROMPT_ENGINE=torch"
        )
    return LlamaCppBackend(
        frozen,
        resolved.folder / resolved.gguf_file,
        max_rows=settings.max_batch_size,
        kv_tokens=settings.llamacpp_kv_tokens,
        prefix_slots=settings.llamacpp_prefix_slots,
        use_prefix_cache=settings.use_prefix_cache,
        threads=settings.threads,
        flash_attention=settings.llamacpp_flash_attention,
    )
