"""Who runs next: the waiting queue, its places, cancellation and admission (no model, no tensors).

A request holds a queue place from `reserve` (before it is even built, so a full queue is
refused at once) until it joins the batch, is cancelled, or fails. `admit` hands the engine's
loop the next waiting requests, first come first served, up to the batch's free rows; a
request cancelled while it waited ends there with finish reason "cancelled".
"""

from __future__ import annotations

import threading
from collections import deque

from server.engine.errors import EngineNotReadyError, QueueFullError, ShuttingDownError
from server.engine.sequence import DoneEvent, GenerationRequest


class Scheduler:
    def __init__(self, *, max_queue: int, retry_after: int):
        self.max_queue, self.retry_after = max_queue, retry_after
        self.waiting: deque[GenerationRequest] = deque()  # the loop's, in arrival order
        self.places = 0  # queue places taken: reserved, or held by a waiting request
        self.closed = False  # set once the loop has ended: no more submissions
        self.lock = threading.Lock()

    # ------------------------------------------------------------ any thread
    def reserve(self, count: int, *, alive: bool) -> None:
        """Take `count` places for requests still being built; QueueFullError at once when they do not all fit."""
        with self.lock:
            if self.closed or not alive:
                raise EngineNotReadyError("The generation engine is not running.")
            if self.places + count > self.max_queue:
                raise QueueFullError(self.places, self.max_queue, self.retry_after)
            self.places += count

    @property
    def full(self) -> bool:
        """Whether a request now would be refused (a lock-free read: callers only use it to refuse early)."""
        return self.places >= self.max_queue

    def release(self, count: int) -> None:
        """Give back places taken by `reserve` for requests that will not be submitted."""
        with self.lock:
            self.places -= count

    def hand_over(self, request: GenerationRequest, deliver) -> None:
        """A reserved place passes to `request`, which `deliver` puts in the loop's inbox, in one step
        against closing (ShuttingDownError once closed)."""
        with self.lock:
            if self.closed:
                self.places -= 1
                raise ShuttingDownError("The server is shutting down.")
            request.holds_queue_place = True
            deliver(request)

    def cancel(self, request: GenerationRequest) -> None:
        """Mark `request` cancelled; a request still waiting gives its place back now, so a client
        that left (or a cancelled evaluation job) never holds places while the batch is full."""
        with self.lock:
            request.cancelled = True
            self._give_back_place(request)

    def waiting_count(self) -> int:
        with self.lock:
            return self.places

    def close(self) -> None:
        with self.lock:
            self.closed = True

    # ------------------------------------------------------------ the loop's thread
    def admit(self, free_rows: int) -> list[GenerationRequest]:
        """The waiting requests that join the batch now (their places freed); cancelled ones end here."""
        if any(request.cancelled for request in self.waiting):  # ended now, not when a batch row frees up
            for request in [r for r in self.waiting if r.cancelled]:
                with self.lock:
                    self._give_back_place(request)
                request.send(cancelled_event(request))
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        admitted: list[GenerationRequest] = []
        while self.waiting and len(admitted) < free_rows:
            request = self.waiting.popleft()
            with self.lock:
                self._give_back_place(request)
            if request.cancelled:
                request.send(cancelled_event(request))
                continue
            admitted.append(request)
        return admitted

    def _give_back_place(self, request: GenerationRequest) -> None:
        """Under the lock: free the place a waiting request holds (once)."""
        if request.holds_queue_place:
            request.holds_queue_place = False
            self.places -= 1


def cancelled_event(request: GenerationRequest) -> DoneEvent:
    """The final event of a request cancelled while it waited."""
    return DoneEvent(
        text="",
        finish_reason="cancelled",
        prompt_tokens=request.prompt_tokens,
        soft_prompt_tokens=request.soft_len,
        completion_tokens=0,
        queue_ms=0.0,
        ttft_ms=0.0,
        prefill_ms=0.0,
        decode_ms=0.0,
        total_ms=0.0,
    )
