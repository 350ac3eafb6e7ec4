"""Refuse generation requests while the engine's queue is full, before any other work.

Under overload most requests are refusals. Routed through FastAPI, each refusal still costs
a route match, dependency resolution and body validation: with clients that retry at once,
that work took most of the CPU the engine needed (bench/overload_bench.py --retry-ms 0). This
ASGI middleware answers them first, with the same 503 `queue_full` body and `Retry-After`
as the route would. It only reads the queue's length; the route's reservation still decides
every request it lets through.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import QueueFullError
from .errors import error_body


class QueueGate:
    def __init__(self, app: ASGIApp, paths: tuple[str, ...]):
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            state = getattr(scope["app"].state, "softprompt", None)
            engine = state.engine if state is not None else None
            if engine is not None and engine.queue_full:
                refusal = QueueFullError(engine.max_queue, engine.max_queue, engine.retry_after)
                body = json.dumps(error_body(refusal)).encode()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(refusal.retry_after).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
