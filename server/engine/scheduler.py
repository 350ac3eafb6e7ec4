"""The generation engine: one thread owns the model and decodes every request in one batch.

Continuous batching: between two decode steps the thread admits waiting requests (any mix
of prompt versions), prefills them together on top of their cached prefixes, and merges
them into the running batch; rows that finish leave at once. Each row is left-padded:

    cache columns  [pad][template head + soft prompt (cached prefix)][pad][tail][generated...]

with an attention mask marking real columns and explicit position ids (= number of real
tokens before a token), so every row computes exactly what it would compute alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from trainer.modeling import FrozenModel

from . import kv as kvops
from . import runner
from .errors import EngineError, EngineNotReadyError, QueueFullError, ShuttingDownError
from .prefix_cache import PrefixCache
from .sampling import choose_tokens, rows_logprobs
from .sequence import DoneEvent, GenerationRequest, Sequence

logger = logging.getLogger(__name__)


class _Call:
    """A function to run in the engine thread between steps, and the future for its result."""

    def __init__(self, fn: Callable[[], object]):
        self.fn, self.future = fn, Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # the caller gets every failure; the engine keeps serving
            self.future.set_exception(exc)


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
        batch_window_ms: float = 0.0,
        reserved_threads: Callable[[], int] | None = None,
        threads: int | None = None,
    ):
        self.frozen, self.model, self.tokenizer = frozen, frozen.model, frozen.tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefix_cache = prefix_cache or PrefixCache(max_bytes=1 << 30)
        self.use_prefix_cache, self.retry_after = use_prefix_cache, retry_after
        self.growing_cache = growing_cache
        self.batch_window_s = batch_window_ms / 1e3
        # CPU threads other work on this host holds (training workers); the engine leaves them free
        self.reserved_threads = reserved_threads or (lambda: 0)
        # torch threads to serve on when nothing is reserved (default: the count now, in this thread)
        self._threads_full = self._threads_now = threads or torch.get_num_threads()
        self.eos_ids = _eos_ids(frozen)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self._pad_id = int(pad)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._waiting_count = 0
        self._lock = threading.Lock()
        self._closed = False  # set under the lock once the loop has ended: no more submissions
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None
        # the running batch
        self._seqs: list[Sequence] = []
        self._cache = None  # DynamicCache [B, H, L, d] per layer
        self._mask: torch.Tensor | None = None  # [B, L]
        self.counters = {"prefill_batches": 0, "decode_steps": 0, "max_batch_size_seen": 0,
                         "tokens_generated": 0, "requests_finished": 0, "requests_failed": 0, "prewarms": 0}

    # ------------------------------------------------------------ thread API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Stop admitting and decoding (requests queue up); used by drains and tests."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._inbox.put(None)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def reserve(self, count: int = 1) -> None:
        """Take `count` places in the queue for requests still being built (thread-safe, never waits).

        Raises QueueFullError at once when they do not all fit, so overload is refused before any
        tokenizing or prompt loading. Hand each place to `submit(request, reserved=True)` or give
        them back with `release(count)`."""
        with self._lock:
            if self._closed or not self.alive:
                raise EngineNotReadyError("The generation engine is not running.")
            if self._waiting_count + count > self.max_queue:
                raise QueueFullError(self._waiting_count, self.max_queue, self.retry_after)
            self._waiting_count += count

    @property
    def queue_full(self) -> bool:
        """Whether a request now would be refused (a lock-free read: callers only use it to refuse early)."""
        return self._waiting_count >= self.max_queue

    def release(self, count: int = 1) -> None:
        """Give back places taken by `reserve()` for requests that will not be submitted."""
        with self._lock:
            self._waiting_count -= count

    def submit(self, request: GenerationRequest, *, reserved: bool = False) -> None:
        """Queue a request (thread-safe). Raises QueueFullError when too many are waiting.

        Once queued, the request gets exactly one final event (done or failed), whatever happens."""
        if not reserved:
            self.reserve()
        with self._lock:
            if self._closed:
                self._waiting_count -= 1
                raise ShuttingDownError("The server is shutting down.")
            request.holds_queue_place = True
            self._inbox.put(request)

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request (thread-safe): the engine ends it at its next step with finish reason
        "cancelled". A request still waiting gives its queue place back now, so a client that left
        (or a cancelled evaluation job) never holds places while the batch is full."""
        with self._lock:
            request.cancelled = True
            self._give_back_place(request)

    def _give_back_place(self, request: GenerationRequest) -> None:
        """Under the lock: free the queue place a waiting request holds (once)."""
        if request.holds_queue_place:
            request.holds_queue_place = False
            self._waiting_count -= 1

    def prewarm(self, prompt_key: tuple | None, soft: torch.Tensor | None, head_ids: tuple[int, ...]) -> Future:
        """Compute (in the engine thread) the prefix KV of a prompt for `head_ids` ahead of use."""
        future: Future = Future()
        self._inbox.put((prompt_key, soft, tuple(head_ids), future))
        return future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the engine thread between two decode steps, with the model to itself.

        This is how offline work (evaluation jobs) uses the resident model without a second
        copy and without racing the decode loop. Serving pauses while `fn` runs: keep each call
        to one small batch. Fails with ShuttingDownError once the engine has stopped."""
        call = _Call(fn)
        with self._lock:
            if self._closed or not self.alive:
                call.future.set_exception(ShuttingDownError("The generation engine is not running."))
            else:
                self._inbox.put(call)
        return call.future

    def stats(self) -> dict:
        with self._lock:
            waiting = self._waiting_count
        return {**self.counters, "running": len(self._seqs), "waiting": waiting,
                "max_batch_size": self.max_batch_size, "threads": self._threads_now,
                "attention": self.model.config._attn_implementation,
                "prefix_cache": self.prefix_cache.stats()}

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_num_threads(self._threads_full)
        try:
            self._serve()
        finally:  # the count set in this thread also becomes the process default: leave the full one
            torch.set_num_threads(self._threads_full)
            self._close_out()

    def _serve(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                idle = not self._seqs and not self._waiting
                self._drain_inbox(block=idle or not self._running.is_set())
                if not self._running.is_set():
                    continue
                self._fit_threads()
                try:
                    self._admit()
                    if self._seqs:
                        self._decode_step()
                except Exception as exc:  # a bug outside the guarded stages: keep serving the next requests
                    logger.exception("engine step failed; failing the running batch")
                    self._fail_running(EngineError(f"The engine failed: {exc}"))

    def _close_out(self) -> None:
        """The loop ended (stop, or a bug): refuse new submissions, fail everything queued or running."""
        with self._lock:
            self._closed = True
        error = ShuttingDownError("The server is shutting down; the request did not finish.")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, GenerationRequest):
                self._waiting.append(item)
            elif isinstance(item, tuple):
                item[-1].set_exception(error)  # a prewarm's future
            elif isinstance(item, _Call) and item.future.set_running_or_notify_cancel():  # not if its caller gave up
                item.future.set_exception(error)
        for request in self._waiting:
            self._fail(request, error)
        self._waiting.clear()
        self._fail_running(error)

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
            torch.set_num_threads(want)  # per thread under OpenMP: must run in the engine thread
            logger.info("engine threads %d -> %d (%d held by other work)", self._threads_now, want, reserved)
            self._threads_now = want

    def _drain_inbox(self, *, block: bool) -> None:
        """Move queued requests to `_waiting` and run prewarms. When the engine was idle, wait up to
        `batch_window_ms` for more arrivals (each resets the wait) so a burst is prefilled together."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        window = self.batch_window_s if block and self._running.is_set() else 0.0
        deadline = time.perf_counter() + 4 * window
        while True:
            if isinstance(item, GenerationRequest):
                self._waiting.append(item)
            elif isinstance(item, tuple):
                self._do_prewarm(*item)
            elif isinstance(item, _Call):
                item.run()
            try:
                wait = min(window, deadline - time.perf_counter())
                item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return

    def _do_prewarm(self, prompt_key, soft, head_ids, future: Future) -> None:
        try:
            key = PrefixCache.key(prompt_key, head_ids)
            if key not in self.prefix_cache:  # not a request: neither a hit nor a miss
                self.prefix_cache.put(key, self._compute_prefix(head_ids, soft))
                self.counters["prewarms"] += 1
            future.set_result(True)
        except Exception as exc:
            logger.exception("prewarm of %s failed", prompt_key)
            future.set_exception(exc)

    # ------------------------------------------------------------ admission + prefill
    def _admit(self) -> None:
        """Move waiting requests into the batch: prefill them together, choose their first tokens.

        Each stage fails only the requests it concerns: a request that cannot start fails alone, a
        failed prefill fails the rows it was prefilling, a failed merge leaves the running batch as
        it was."""
        if any(request.cancelled for request in self._waiting):  # ended now, not when a batch row frees up
            for request in [r for r in self._waiting if r.cancelled]:
                with self._lock:
                    self._give_back_place(request)
                request.send(_cancelled(request))
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        new: list[Sequence] = []
        while self._waiting and len(self._seqs) + len(new) < self.max_batch_size:
            request = self._waiting.popleft()
            with self._lock:
                self._give_back_place(request)
            if request.cancelled:
                request.send(_cancelled(request))
                continue
            try:
                new.append(Sequence(request, self.tokenizer, self.eos_ids))
            except Exception as exc:
                logger.exception("could not start a request")
                self._fail(request, EngineError(f"The request could not start: {exc}"))
        if not new:
            return
        started = time.perf_counter()
        try:
            kv, mask, logits = self._prefill([s.request for s in new])
            self.counters["prefill_batches"] += 1
            elapsed = (time.perf_counter() - started) * 1e3
            size = len(self._seqs) + len(new)
            for s in new:
                s.prefill_ms, s.joined_batch = elapsed, size
            self._advance(new, logits)
            running = [] if self._cache is None else [(kvops.from_cache(self._cache), self._mask)]
            kv, mask = kvops.stack_rows(running + [(kv, mask)])
            cache = self._decode_cache(kv, self._seqs + new)
        except Exception as exc:
            logger.exception("prefill of %d new rows failed", len(new))
            for s in new:
                self._fail(s.request, EngineError(f"Prefill failed: {exc}"))
            return
        self._seqs += new
        self._cache, self._mask = cache, mask
        self._retire_finished()

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[kvops.KV, torch.Tensor, torch.Tensor]:
        """One forward over every new row's tail on top of its prefix: (kv, mask [b, L], logits [b, V])."""
        pad = self.frozen.embedding(torch.tensor(self._pad_id, device=self.model.device))  # [D]
        return runner.prefill(self.model, [self._row_inputs(request) for request in requests], pad)

    def _row_inputs(self, request: GenerationRequest) -> tuple[kvops.KV | None, torch.Tensor]:
        """(prefix key/values or None, the embeddings after them [n, D]) for one new row: the fixed
        block comes from the prefix cache when it can be reused, else it goes through the forward pass."""
        tail = runner.embed_tail(self.frozen, request.tail_ids)  # [t, D]
        if self.use_prefix_cache and request.tail_ids and (request.head_ids or request.soft_len):
            return self._prefix(request.prompt_key, request.head_ids, request.soft), tail
        return None, runner.whole_row(runner.embed_block(self.frozen, request.head_ids, request.soft), tail)  # [P+t, D]

    def _prefix(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> kvops.KV:
        """The fixed block's key/values from the cache, computed and cached on a miss."""
        key = PrefixCache.key(prompt_key, head_ids)
        prefix = self.prefix_cache.get(key)
        if prefix is None:
            prefix = self._compute_prefix(head_ids, soft)
            self.prefix_cache.put(key, prefix)
        return prefix

    def _compute_prefix(self, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> kvops.KV:
        return runner.compute_prefix(self.model, runner.embed_block(self.frozen, head_ids, soft))

    # ------------------------------------------------------------ decoding
    def _decode_step(self) -> None:
        seqs = self._seqs
        try:
            logits, cache, mask = runner.decode_step(self.model, [s.ids[-1] for s in seqs], self._mask, self._cache)
        except Exception as exc:  # the shared batch state is unknown now: every row in it fails
            logger.exception("decode step over %d rows failed", len(seqs))
            self._fail_running(EngineError(f"Decoding failed: {exc}"))
            return
        self._cache, self._mask = cache, mask
        self.counters["decode_steps"] += 1
        self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(seqs))
        for s in seqs:
            s.max_batch = max(s.max_batch, len(seqs))
        self._advance(seqs, logits)
        self._retire_finished()

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose and record each row's next token (logits [B, V]); a row that fails here fails alone."""
        tokens = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        logprobs = rows_logprobs(logits, tokens, [s.params for s in seqs])
        for row, (s, token) in enumerate(zip(seqs, tokens)):
            if s.request.cancelled or s.request.closed:
                continue
            if isinstance(token, Exception):
                self._fail(s.request, token)
                continue
            try:
                s.push(token, logprobs.get(row))
            except Exception as exc:
                logger.exception("could not record a token")
                self._fail(s.request, EngineError(f"Could not decode the output: {exc}"))
        self.counters["tokens_generated"] += len(seqs)

    def _retire_finished(self) -> None:
        done = [i for i, s in enumerate(self._seqs) if s.finish_reason is not None or s.request.cancelled or s.request.closed]
        if not done:
            return
        for i in done:
            if not self._seqs[i].request.closed:
                self._seqs[i].finish()
                self.counters["requests_finished"] += 1
        keep = [i for i in range(len(self._seqs)) if i not in set(done)]
        self._seqs = [self._seqs[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        kv = kvops.select_rows(kvops.from_cache(self._cache), index)
        kv, mask = kvops.trim_left(kv, self._mask.index_select(0, index))
        self._cache, self._mask = self._decode_cache(kv, self._seqs), mask

    def _decode_cache(self, kv: kvops.KV, seqs: list[Sequence]):
        """The cache the decode steps append to: room for the longest remaining generation."""
        if not self.growing_cache:
            return kvops.to_cache(kv)
        spare = max(s.params.max_new_tokens - len(s.ids) for s in seqs) + 1
        return kvops.to_growing_cache(kv, spare)

    def _fail(self, request: GenerationRequest, error: Exception) -> None:
        if not request.closed:
            self.counters["requests_failed"] += 1
        request.fail(error)

    def _fail_running(self, error: Exception) -> None:
        for s in self._seqs:
            self._fail(s.request, error)
        self._seqs, self._cache, self._mask = [], None, None


def _cancelled(request: GenerationRequest) -> DoneEvent:
    """The final event of a request cancelled while it waited."""
    return DoneEvent(text="", finish_reason="cancelled", prompt_tokens=request.prompt_tokens, soft_prompt_tokens=request.soft_len,
                     completion_tokens=0, queue_ms=0.0, ttft_ms=0.0, prefill_ms=0.0, decode_ms=0.0, total_ms=0.0)


def _eos_ids(frozen: FrozenModel) -> set[int]:
    ids = set()
    for source in (frozen.tokenizer.eos_token_id, getattr(frozen.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
