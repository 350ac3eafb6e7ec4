"""Turns an HTTP generation request into an engine Job and hands its events to asyncio.

Everything that can fail for the caller's reasons (unknown prompt, incompatible prompt,
input too long) fails here, before the request takes a place in the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from concurrent.futures import ThreadPoolExecutor

from trainer.layout import ChatLayout, PromptLayout
from trainer.modeling import FrozenModel

from .engine import (
    DoneEvent,
    Engine,
    Event,
    FailedEvent,
    InputTooLongError,
    InvalidGenerationRequestError,
    Job,
    PromptCache,
    SamplingParams,
    TokenEvent,
)


class RequestHandle:
    """The asyncio end of one engine request: events arrive through call_soon_threadsafe."""

    def __init__(self, job: Job, prompt_label: str | None, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.job, self.prompt_label = job, prompt_label
        self._loop, self._queue = loop, queue

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if isinstance(event, FailedEvent):
                raise event.error
            yield event
            if isinstance(event, DoneEvent):
                return

    async def result(self) -> DoneEvent:
        try:
            async for event in self.events():
                if isinstance(event, DoneEvent):
                    return event
        except asyncio.CancelledError:
            self.cancel()
            raise
        raise RuntimeError("engine stream ended without a result")

    def cancel(self) -> None:
        """Client went away: the engine drops the row at its next step."""
        self.job.cancelled = True


@dataclass
class GenerationInput:
    input: str | None
    messages: list[dict] | None
    params: SamplingParams


class GenerationService:
    def __init__(self, frozen: FrozenModel, engine: Engine, prompts: PromptCache, *, max_new_tokens_limit: int = 512):
        self.frozen, self.engine, self.prompts = frozen, engine, prompts
        self.max_new_tokens_limit = max_new_tokens_limit
        self.layout = ChatLayout(frozen.tokenizer)
        # Building a request (chat template, tokenizer, prompt load) is Python that holds the GIL:
        # one thread does it, so under a burst the event loop competes with one builder, not with
        # the forty of the shared thread pool (bench/overload_bench.py: slow 503s otherwise).
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-builder")

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    @property
    def default_head(self) -> tuple[int, ...]:
        """Template head of a single-turn request: what the prefix cache is pre-warmed for."""
        return self.layout.for_input("x").head_ids

    def _layout(self, request: GenerationInput) -> PromptLayout:
        try:
            if request.messages:
                return self.layout.for_messages(request.messages)
            return self.layout.for_input(request.input or "")
        except ValueError as exc:
            raise InvalidGenerationRequestError(str(exc)) from exc

    def _build(self, prompt_ref: str | None, request: GenerationInput, sink) -> tuple[Job, str | None]:
        if request.params.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidGenerationRequestError(
                f"max_new_tokens {request.params.max_new_tokens} is above this server's limit {self.max_new_tokens_limit}."
            )
        loaded = self.prompts.get(prompt_ref) if prompt_ref else None
        layout = self._layout(request)
        job = Job(
            prompt_key=loaded.cache_key if loaded else None,
            soft=loaded.embeddings if loaded else None,
            head_ids=layout.head_ids,
            tail_ids=layout.tail_ids,
            params=request.params,
            sink=sink,
        )
        limit = self.frozen.context_length
        if job.prompt_tokens + request.params.max_new_tokens > limit:
            raise InputTooLongError(job.prompt_tokens, request.params.max_new_tokens, limit)
        return job, (str(loaded.version.id) if loaded else None)

    async def start(self, prompt_ref: str | None, request: GenerationInput, *, stream: bool = True) -> RequestHandle:
        """Resolve, validate and queue a request; raises the domain error if it cannot be served.

        Without `stream` only the final event crosses into the event loop: a token event per
        row per step would wake the loop 16 times a step at batch 16, and on a 2-core machine
        that Python work competes with the decode step's matmul threads."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:
            if stream or not isinstance(event, TokenEvent):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        self.engine.reserve()  # a full queue answers at once, before any tokenizing or prompt loading
        try:
            job, label = await loop.run_in_executor(self._builder, self._build, prompt_ref, request, sink)
        except BaseException:  # a refused request or a client that left: give the place back
            self.engine.release()
            raise
        self.engine.submit(job, reserved=True)
        return RequestHandle(job, label, loop, queue)
