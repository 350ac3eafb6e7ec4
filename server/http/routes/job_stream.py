"""Server-Sent Events for any job (training or evaluation): its record on every change, then `end`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from jobs import JobService
from jobs.records import JobRecord
from prompt_store import StoreUnavailableError


def job_event_stream(
    jobs: JobService, record: JobRecord, request: Request, render: Callable[[JobRecord], dict]
) -> EventSourceResponse:
    """One `progress` event per change of the job (rendered by `render`), then a final `end` event."""

    async def events():
        current = record
        yield {"event": "progress", "data": json.dumps(render(current))}
        while not current.state.finished:
            if await request.is_disconnected():
                return
            try:
                newer = await asyncio.to_thread(jobs.wait_for_change, record.id, current.revision, 10.0)
            except StoreUnavailableError:  # the jobs' database is away: keep the stream, try again
                await asyncio.sleep(1.0)
                continue
            if newer.revision != current.revision:
                current = newer
                yield {"event": "progress", "data": json.dumps(render(current))}
        yield {"event": "end", "data": json.dumps(render(current))}

    return EventSourceResponse(events())
