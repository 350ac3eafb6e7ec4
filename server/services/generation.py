"""Turns an HTTP generation request into an engine GenerationRequest and hands its events to asyncio.

Everything that can fail for the caller's reasons (unknown prompt, incompatible prompt,
input too long) fails here, before the request takes a place in the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from core.layout import ChatLayout, PromptLayout
from core.modeling import FrozenModel
from prompt_store import LoadedPrompt
from server.engine import (
    DoneEvent,
    Engine,
    Event,
    FailedEvent,
    GenerationRequest,
    InputTooLongError,
    InvalidGenerationRequestError,
    SamplingParams,
    TokenEvent,
)
from server.engine.sequence import DEFAULT_TENANT
from server.services.metrics import RequestMetrics
from server.services.prompt_cache import PromptCache
from server.services.tenants import Tenants

RESOLVER_THREADS = 4  # prompt references resolved at once (each may wait on the store's database)


class RequestHandle:
    """The asyncio end of one engine request. The engine thread calls `sink` with every event;
    it records the finished request's metrics there (exactly once, whether or not anyone still
    listens) and hands events to the event loop: all of them when streaming, else only the
    final one (a token event per row per step would wake the loop 16 times a step at batch 16,
    and on a 2-core machine that Python work competes with the decode step's threads)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: Engine,
        *,
        stream: bool,
        metrics: RequestMetrics | None,
        tenants: Tenants | None = None,
    ):
        self.engine, self.tenants = engine, tenants
        self.request: GenerationRequest | None = None  # set once built, before the engine sees it
        self.done: DoneEvent | None = None  # the final event, once a reader has seen it
        self.prompt_label: str | None = None  # the resolved version, e.g. "math-v3"
        self._loop, self._stream, self._metrics = loop, stream, metrics
        self._queue: asyncio.Queue = asyncio.Queue()

    def sink(self, event: Event) -> None:
        if self._metrics is not None and not isinstance(event, TokenEvent):
            self._metrics.observe(self.request, event)
        if self.tenants is not None and isinstance(event, DoneEvent):  # its tokens-per-minute bucket pays
            self.tenants.charge(self.request.tenant, event.completion_tokens)
        if self._stream or not isinstance(event, TokenEvent):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if isinstance(event, FailedEvent):
                raise event.error
            if isinstance(event, DoneEvent):
                self.done = event
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
        """Client went away: the engine drops the row at its next step (and frees its queue place now)."""
        if self.request is not None:
            self.engine.cancel(self.request)


@dataclass
class GenerationInput:
    input: str | None
    messages: list[dict] | None
    params: SamplingParams
    fit_max_new_tokens: bool = False  # cap max_new_tokens at what the context leaves (OpenAI chat's default)


class GenerationService:
    def __init__(
        self,
        frozen: FrozenModel,
        engine: Engine,
        prompts: PromptCache,
        *,
        max_new_tokens_limit: int = 512,
        metrics: RequestMetrics | None = None,
        tenants: Tenants | None = None,
    ):
        self.frozen, self.engine, self.prompts, self.metrics = frozen, engine, prompts, metrics
        self.tenants = tenants  # whose tokens-per-minute a finished request is charged to
        self.max_new_tokens_limit = max_new_tokens_limit
        self.layout = ChatLayout(frozen.tokenizer)
        # Building a request (chat template, tokenizer) is Python that holds the GIL: one thread
        # does it, so under a burst the event loop competes with one builder, not with the forty
        # of the shared thread pool (bench/overload_bench.py: slow 503s otherwise). Resolving a
        # prompt asks the store, which may wait on a database: that happens on threads of its
        # own, so a request that needs no store never waits behind one that does.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-builder")
        self._resolver = ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="prompt-resolver")

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)
        self._resolver.shutdown(wait=False, cancel_futures=True)

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

    def _build(self, loaded: LoadedPrompt | None, request: GenerationInput, handle: RequestHandle, tenant: str) -> None:
        if request.params.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidGenerationRequestError(
                f"max_new_tokens {request.params.max_new_tokens} is above this server's limit "
                f"{self.max_new_tokens_limit}."
            )
        layout = self._layout(request)
        engine_request = GenerationRequest(
            prompt_key=loaded.cache_key if loaded else None,
            soft=loaded.embeddings if loaded else None,
            head_ids=layout.head_ids,
            tail_ids=layout.tail_ids,
            params=request.params,
            sink=handle.sink,
            tenant=tenant,
        )
        limit = self.frozen.context_length
        if (
            request.fit_max_new_tokens
            and 0 < limit - engine_request.prompt_tokens < engine_request.params.max_new_tokens
        ):
            engine_request.params = replace(engine_request.params, max_new_tokens=limit - engine_request.prompt_tokens)
        if engine_request.prompt_tokens + engine_request.params.max_new_tokens > limit:
            raise InputTooLongError(engine_request.prompt_tokens, engine_request.params.max_new_tokens, limit)
        handle.request, handle.prompt_label = engine_request, (str(loaded.version.id) if loaded else None)

    def _build_all(
        self, loaded: LoadedPrompt | None, requests: list[GenerationInput], handles: list[RequestHandle], tenant: str
    ) -> None:
        for request, handle in zip(requests, handles):
            self._build(loaded, request, handle, tenant)

    async def start(
        self, prompt_ref: str | None, request: GenerationInput, *, stream: bool = True, tenant: str = DEFAULT_TENANT
    ) -> RequestHandle:
        """Resolve, validate and queue a request; raises the domain error if it cannot be served."""
        [handle] = await self.start_many(prompt_ref, [request], stream=stream, tenant=tenant)
        return handle

    async def start_many(
        self,
        prompt_ref: str | None,
        requests: list[GenerationInput],
        *,
        stream: bool = True,
        tenant: str = DEFAULT_TENANT,
    ) -> list[RequestHandle]:
        """Queue several requests for one prompt reference (OpenAI's `n`, a list of prompts): all
        of them or, when one cannot be served, none."""
        if len(requests) > self.engine.max_queue:  # would never fit: not a reason to retry later
            raise InvalidGenerationRequestError(
                f"{len(requests)} rows (prompts x n) are more than this server queues at once "
                f"({self.engine.max_queue})."
            )
        loop = asyncio.get_running_loop()
        handles = [
            RequestHandle(loop, self.engine, stream=stream, metrics=self.metrics, tenants=self.tenants)
            for _ in requests
        ]
        # a full queue (or this tenant's full share of it) answers at once, before any tokenizing or prompt loading
        self.engine.reserve(len(requests), tenant)
        try:
            loaded = await loop.run_in_executor(self._resolver, self.prompts.get, prompt_ref) if prompt_ref else None
            await loop.run_in_executor(self._builder, self._build_all, loaded, requests, handles, tenant)
        except BaseException:  # a refused request or a client that left: give the places back
            self.engine.release(len(requests), tenant)
            raise
        for handle in handles:
            self.engine.submit(handle.request, reserved=True)
        return handles
