"""server.services.generation: the asyncio end of engine requests (tiny model, real engine thread)."""

from __future__ import annotations

import asyncio

from server.engine import DoneEvent, Engine, SamplingParams, TokenEvent
from server.services.generation import GenerationInput, GenerationService


def test_non_streamed_request_wakes_the_event_loop_only_for_its_result(frozen):
    engine = Engine(frozen, max_batch_size=4)
    engine.start()
    service = GenerationService(frozen, engine, prompts=None)

    async def events(stream: bool) -> list:
        request = GenerationInput(
            input="Hello there", messages=None, params=SamplingParams(max_new_tokens=8, ignore_eos=True)
        )
        handle = await service.start(None, request, stream=stream)
        return [event async for event in handle.events()]

    try:
        streamed, plain = asyncio.run(events(True)), asyncio.run(events(False))
    finally:
        engine.stop()
    assert [type(e) for e in plain] == [DoneEvent]
    assert all(isinstance(e, TokenEvent) for e in streamed[:-1]) and len(streamed) > 2
    assert "".join(e.text for e in streamed[:-1]) == streamed[-1].text == plain[0].text
    assert plain[0].completion_tokens == 8
