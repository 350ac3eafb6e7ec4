"""The generation engine: one thread owns the model and decodes every request in one batch.

Continuous batching: between two decode steps the thread takes what arrived in its inbox (a
typed message each: a request, a prewarm, a call), admits waiting requests (any mix of prompt
versions, scheduler.py), has the backend prefill them together on top of their cached prefixes
(backend.py: torch or llama.cpp), and merges them into the running batch (batch.py); rows that
finish leave at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.modeling import FrozenModel
from server.engine.backend import Backend
from server.engine.batch import Batch
from server.engine.errors import EngineError, ShuttingDownError
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduler import Scheduler
from server.engine.sequence import DEFAULT_TENANT, GenerationRequest, Sequence
from server.engine.torch_backend import TorchBackend

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the inbox's messages
@dataclass
class Prewarm:
    """Compute a prompt's prefix key/values ahead of use; `future` gets True once cached."""

    prompt_key: tuple | None
    soft: torch.Tensor | None
    head_ids: tuple[int, ...]
    future: Future = field(default_factory=Future)


@dataclass
class Call:
    """A function to run in the engine thread between steps, and the future for its result."""

    fn: Callable[[], object]
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # the caller gets every failure; the engine keeps serving
            self.future.set_exception(exc)


class Wake:
    """Nothing to do but look again (resume, stop)."""


Message = GenerationRequest | Prewarm | Call | Wake


class Engine:
    def __init__(
        self,
        frozen: FrozenModel,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        prefix_cache: PrefixCache | None = None,
        use_prefix_cache: bool = True,
        retry_after: int = 1,
        growing_cache: bool = True,
        input_cache: PrefixCache | None = None,
        batch_window_ms: float = 0.0,
        scheduling: str = "fair",
        reserved_threads: Callable[[], int] | None = None,
        flooding: Callable[[str], bool] | None = None,
        flood_rows: float = 0.125,
        threads: int | None = None,
        backend: Backend | None = None,
        pack_prefills: bool = True,
    ):
        """`backend` computes the rows (default: a TorchBackend on `frozen`, which `prefix_cache`,
        `use_prefix_cache`, `growing_cache` and `input_cache` configure); `frozen` always gives the
        tokenizer. `pack_prefills`: new rows' prefill inside the running rows' step (packed.py)."""
        self.frozen, self.model, self.tokenizer = frozen, frozen.model, frozen.tokenizer
        self.max_batch_size, self.max_queue, self.retry_after = max_batch_size, max_queue, retry_after
        self.batch_window_s = batch_window_ms / 1e3
        self.pack_prefills = pack_prefills
        # CPU threads other work on this host holds (training workers); the engine leaves them free
        self.reserved_threads = reserved_threads or (lambda: 0)
        # torch threads to serve on when nothing is reserved (default: the count now, in this thread)
        self._threads_full = self._threads_now = threads or torch.get_num_threads()
        self.eos_ids = _eos_ids(frozen)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.counters = {
            "prefill_batches": 0,
            "packed_prefills": 0,  # of them, inside a decode step of the running rows
            "decode_steps": 0,
            "max_batch_size_seen": 0,
            "tokens_generated": 0,
            "requests_finished": 0,
            "requests_failed": 0,
            "prewarms": 0,
        }
        self.scheduler = Scheduler(
            max_queue=max_queue, retry_after=retry_after, policy=scheduling, flooding=flooding, flood_rows=flood_rows
        )
        self.backend = backend or TorchBackend(
            frozen,
            pad_id=int(pad),
            prefix_cache=prefix_cache,
            use_prefix_cache=use_prefix_cache,
            growing_cache=growing_cache,
            input_cache=input_cache,
        )
        self.prefix_cache = self.backend.prefix_cache
        self.batch = Batch(self.backend, self.counters)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ thread API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Stop admitting and decoding (requests queue up); used by drains and tests."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._inbox.put(Wake())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def reserve(self, count: int = 1, tenant: str = DEFAULT_TENANT) -> None:
        """Take `count` places in the queue for requests still being built (thread-safe, never waits).

        Raises QueueFullError at once when they do not all fit, so overload is refused before any
        tokenizing or prompt loading. Hand each place to `submit(request, reserved=True)` or give
        them back with `release(count)`."""
        self.scheduler.reserve(count, alive=self.alive, tenant=tenant)

    @property
    def queue_full(self) -> bool:
        return self.scheduler.refuses()

    def refuses(self, tenant: str) -> bool:
        """Whether a request of `tenant` would find no place now (a lock-free read, to refuse early)."""
        return self.scheduler.refuses(tenant)

    def release(self, count: int = 1, tenant: str = DEFAULT_TENANT) -> None:
        self.scheduler.release(count, tenant)

    def submit(self, request: GenerationRequest, *, reserved: bool = False) -> None:
        """Queue a request (thread-safe). Raises QueueFullError when too many are waiting.

        Once queued, the request gets exactly one final event (done or failed), whatever happens."""
        if not reserved:
            self.reserve(tenant=request.tenant)
        self.scheduler.hand_over(request, self._inbox.put)

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request (thread-safe): the engine ends it at its next step with finish reason
        "cancelled"; a request still waiting gives its queue place back now."""
        self.scheduler.cancel(request)

    def prewarm(self, prompt_key: tuple | None, soft: torch.Tensor | None, head_ids: tuple[int, ...]) -> Future:
        """Compute (in the engine thread) the prefix KV of a prompt for `head_ids` ahead of use."""
        message = Prewarm(prompt_key, soft, tuple(head_ids))
        self._inbox.put(message)
        return message.future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the engine thread between two decode steps, with the model to itself.

        This is how offline work (evaluation jobs) uses the resident model without a second
        copy and without racing the decode loop. Serving pauses while `fn` runs: keep each call
        to one small batch. Fails with ShuttingDownError once the engine has stopped."""
        message = Call(fn)
        with self.scheduler.lock:
            if self.scheduler.closed or not self.alive:
                message.future.set_exception(ShuttingDownError("The generation engine is not running."))
            else:
                self._inbox.put(message)
        return message.future

    def stats(self) -> dict:
        return {
            **self.counters,
            "running": len(self.batch),
            "waiting": self.scheduler.waiting_count(),
            "max_batch_size": self.max_batch_size,
            "threads": self._threads_now,
            **self.backend.stats(),
        }

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        self.backend.set_threads(self._threads_full)
        try:
            self._serve()
        finally:  # the count set in this thread also becomes the process default: leave the full one
            torch.set_num_threads(self._threads_full)
            self._close_out()
            self.backend.close()

    def _serve(self) -> None:
        stalled = False  # requests wait, none may start, nothing runs: wait for news, do not spin
        with torch.inference_mode():
            while not self._stop.is_set():
                idle = not self.batch.seqs and (stalled or not self.scheduler.waiting)
                self._drain_inbox(block=idle or not self._running.is_set(), timeout=0.05 if stalled else 0.5)
                if not self._running.is_set():
                    continue
                self._fit_threads()
                try:
                    stalled = not self._admit() and not self.batch.seqs and bool(self.scheduler.waiting)
                    if self.batch.seqs:
                        self._decode_step()
                except Exception as exc:  # a bug outside the guarded stages: keep serving the next requests
                    logger.exception("engine step failed; failing the running batch")
                    self.batch.fail_all(EngineError(f"The engine failed: {exc}"))

    def _deliver(self, message: Message) -> None:
        match message:
            case GenerationRequest():
                self.scheduler.waiting.append(message)
            case Prewarm():
                self._do_prewarm(message)
            case Call():
                message.run()
            case Wake():
                pass

    def _drain_inbox(self, *, block: bool, timeout: float = 0.5) -> None:
        """Deliver what arrived. When the engine was idle, wait up to `batch_window_ms` for more
        arrivals (each resets the wait, at most 4x) so a burst is prefilled together."""
        try:
            message = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        window = self.batch_window_s if block and self._running.is_set() else 0.0
        deadline = time.perf_counter() + 4 * window
        while True:
            self._deliver(message)
            try:
                wait = min(window, deadline - time.perf_counter())
                message = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return

    def _close_out(self) -> None:
        """The loop ended (stop, or a bug): refuse new submissions, fail everything queued or running."""
        self.scheduler.close()
        error = ShuttingDownError("The server is shutting down; the request did not finish.")
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, GenerationRequest):
                self.scheduler.waiting.append(message)
            elif isinstance(message, Prewarm):
                message.future.set_exception(error)
            elif (
                isinstance(message, Call) and message.future.set_running_or_notify_cancel()
            ):  # not if its caller gave up
                message.future.set_exception(error)
        for request in self.scheduler.waiting:
            self.batch.fail(request, error)
        self.scheduler.waiting.clear()
        self.batch.fail_all(error)

    def _fit_threads(self) -> None:
        """Use the threads the host's other work leaves free (at least one). Two runnable threads
        per core make each other wait: beside a 1-thread training worker on 2 cores, a batch-16
        step on 1 serving thread beat 2 threads, sleeping or spinning (bench/omp_ab.py --busy)."""
        try:
            reserved = self.reserved_threads()
        except Exception:  # a broken probe must not fail the batch: keep the current count
            logger.exception("could not read the threads other work holds; keeping %d", self._threads_now)
            return
        want = max(1, self._threads_full - reserved)
        if want != self._threads_now:
            self.backend.set_threads(want)  # torch's is per thread under OpenMP: run in the engine thread
            logger.info("engine threads %d -> %d (%d held by other work)", self._threads_now, want, reserved)
            self._threads_now = want

    def _do_prewarm(self, message: Prewarm) -> None:
        try:
            if self.backend.prewarm(message.prompt_key, message.head_ids, message.soft):
                self.counters["prewarms"] += 1
            message.future.set_result(True)
        except Exception as exc:
            logger.exception("prewarm of %s failed", message.prompt_key)
            message.future.set_exception(exc)

    # ------------------------------------------------------------ the steps (the loop's; benches call them too)
    def _admit(self) -> int:
        """Move waiting requests into the batch: prefill them together, choose their first tokens.
        Returns how many were taken from the queue.

        Each stage fails only the requests it concerns: a request that cannot start fails alone, a
        failed prefill fails the rows it was prefilling, a failed merge leaves the running batch as
        it was."""
        new: list[Sequence] = []
        running = Counter(s.request.tenant for s in self.batch.seqs)
        admitted = self.scheduler.admit(self.max_batch_size - len(self.batch), running, self.backend.fits)
        for request in admitted:
            try:
                new.append(Sequence(request, self.tokenizer, self.eos_ids))
            except Exception as exc:
                logger.exception("could not start a request")
                self.batch.fail(request, EngineError(f"The request could not start: {exc}"))
        if not new:
            return len(admitted)
        started = time.perf_counter()
        if self.batch.seqs and self.pack_prefills and self.backend.packs([s.request for s in new]):
            self._admit_beside(new, started)
            return len(admitted)
        try:
            state, logits = self._prefill([s.request for s in new])
        except Exception as exc:
            logger.exception("prefill of %d new rows failed", len(new))
            for s in new:
                self.batch.fail(s.request, EngineError(f"Prefill failed: {exc}"))
            return len(admitted)
        self.counters["prefill_batches"] += 1
        elapsed = (time.perf_counter() - started) * 1e3
        size = len(self.batch) + len(new)
        for s in new:
            s.prefill_ms, s.joined_batch = elapsed, size
        try:
            self.batch.join(new, state, logits)
        except Exception as exc:
            logger.exception("could not merge %d new rows into the batch", len(new))
            self.backend.discard(state)
            for s in new:
                self.batch.fail(s.request, EngineError(f"Prefill failed: {exc}"))
            return len(admitted)
        self.batch.retire_finished()
        return len(admitted)

    def _admit_beside(self, new: list[Sequence], started: float) -> None:
        """Prefill new rows inside the running rows' next decode step (packed.py): one forward pass
        instead of a pass of their own that every running row waits for."""
        ready, prepared = [], []
        for s in new:
            try:
                prepared.append(self.backend.prepare_beside(s.request))
                ready.append(s)
            except Exception as exc:  # nothing shared was touched: this row alone fails
                logger.exception("could not prepare a new row")
                self.batch.fail(s.request, EngineError(f"Prefill failed: {exc}"))
        if not ready:
            return
        size = len(self.batch) + len(ready)
        self.batch.join_beside(ready, prepared)
        self.counters["prefill_batches"] += 1
        self.counters["packed_prefills"] += 1
        elapsed = (time.perf_counter() - started) * 1e3
        for s in ready:
            s.prefill_ms, s.joined_batch = elapsed, size
        self.batch.retire_finished()

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[object, torch.Tensor]:
        return self.backend.prefill(requests)

    def _decode_step(self) -> None:
        self.batch.step()


def _eos_ids(frozen: FrozenModel) -> set[int]:
    ids = set()
    for source in (frozen.tokenizer.eos_token_id, getattr(frozen.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
