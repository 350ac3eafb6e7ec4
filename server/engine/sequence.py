"""One request inside the engine: what it asked for, what it produced, and its events.

Text is decoded incrementally (offsets as in TGI/vLLM) so streaming pieces always add up to
the final text; stop strings end the sequence and are cut from the text; text that could be
the start of a stop string is held back from the stream until it is decided.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.sampling import SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "anonymous"  # the requests of no client key in particular


@dataclass
class TokenEvent:
    text: str
    token_id: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens this piece completes, if asked


@dataclass
class DoneEvent:
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length"
    prompt_tokens: int
    soft_prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    batch_sizes: tuple[int, int] = (0, 0)  # (size when it joined, largest size it decoded in)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, if asked
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was chosen


@dataclass
class FailedEvent:
    error: Exception


Event = TokenEvent | DoneEvent | FailedEvent


@dataclass
class GenerationRequest:
    """What the engine needs to serve one request (built by the caller, validated already).

    `prompt_key` identifies the soft prompt (None for the bare model); `soft` is its `[P, D]`
    tensor; `head_ids` go before it and `tail_ids` after it (see core.layout).
    """

    prompt_key: tuple | None
    soft: torch.Tensor | None
    head_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    closed: bool = False  # a final event (done or failed) was sent; nothing follows it
    holds_queue_place: bool = False  # queued and not yet admitted or cancelled (the engine's lock guards it)
    tenant: str = DEFAULT_TENANT  # the client key's name: whose share of the queue and turn in admission it takes

    def send(self, event: Event) -> None:
        """Deliver an event. The first final event closes the request: every request gets exactly
        one, whichever part of the engine ends it. A failing sink never reaches the engine."""
        if self.closed:
            return
        if not isinstance(event, TokenEvent):
            self.closed = True
        try:
            self.sink(event)
        except Exception:
            logger.exception("could not deliver %s", type(event).__name__)

    def fail(self, error: Exception) -> None:
        self.send(FailedEvent(error))

    @property
    def soft_len(self) -> int:
        return 0 if self.soft is None else int(self.soft.shape[0])

    @property
    def prompt_tokens(self) -> int:
        return len(self.head_ids) + self.soft_len + len(self.tail_ids)


class Sequence:
    """A running row: generated ids, incremental text, stop handling, timings."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int]):
        self.request, self.tokenizer, self.eos_ids = request, tokenizer, eos_ids
        self.params = request.params
        self.generator = request.params.generator()
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.token_times: list[float] = []
        self._logprobs_sent = 0
        self.text = ""
        self.emitted = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self._hold = max((len(s) for s in request.params.stop), default=1) - 1
        self.finish_reason: str | None = None
        self.admitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.prefill_ms = 0.0
        self.joined_batch = 0
        self.max_batch = 0

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token, emit new text, and decide whether the sequence is done."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.token_times.append(now)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.ids.append(token)
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            self._decode_tail()
            self._check_stop()
        if self.finish_reason is None and len(self.ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        self._emit(final=self.finish_reason is not None)

    def _decode_tail(self) -> None:
        ids = self.ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _check_stop(self) -> None:
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return

    def _emit(self, *, final: bool) -> None:
        upto = len(self.text) if final else max(self.emitted, len(self.text) - self._hold)
        if upto > self.emitted:
            self.request.send(
                TokenEvent(self.text[self.emitted : upto], self.ids[-1], self.logprobs[self._logprobs_sent :])
            )
            self.emitted, self._logprobs_sent = upto, len(self.logprobs)

    def finish(self) -> None:
        now = time.perf_counter()
        request = self.request
        first = self.first_token_at or now
        request.send(
            DoneEvent(
                text=self.text,
                finish_reason=self.finish_reason or "cancelled",
                prompt_tokens=request.prompt_tokens,
                soft_prompt_tokens=request.soft_len,
                completion_tokens=len(self.ids),
                queue_ms=(self.admitted_at - request.submitted_at) * 1e3,
                ttft_ms=(first - request.submitted_at) * 1e3,
                prefill_ms=self.prefill_ms,
                decode_ms=(now - first) * 1e3,
                total_ms=(now - request.submitted_at) * 1e3,
                batch_sizes=(self.joined_batch, self.max_batch),
                token_ids=list(self.ids),
                logprobs=list(self.logprobs),
                token_times=list(self.token_times),
            )
        )
