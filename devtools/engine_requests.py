"""Engine requests built from text, and a sink that collects their events (tests and benches)."""

from __future__ import annotations

import queue

import torch

from core.layout import ChatLayout
from server.engine import DoneEvent, FailedEvent, GenerationRequest, SamplingParams, TokenEvent


class Collector:
    """A sink that records every event of one job."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def result(self, timeout: float = 30.0) -> tuple[DoneEvent, list[TokenEvent]]:
        pieces = []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, TokenEvent):
                pieces.append(event)
            elif isinstance(event, FailedEvent):
                raise event.error
            else:
                return event, pieces


def make_job(
    tokenizer, text: str, soft: torch.Tensor | None = None, key: tuple | None = None, **params
) -> tuple[GenerationRequest, Collector]:
    layout = ChatLayout(tokenizer).for_input(text)
    sink = Collector()
    params.setdefault("max_new_tokens", 12)
    job = GenerationRequest(
        prompt_key=key if soft is None or key is not None else ("p", id(soft), "x"),
        soft=soft,
        head_ids=layout.head_ids,
        tail_ids=layout.tail_ids,
        params=SamplingParams(**params),
        sink=sink,
    )
    return job, sink
