"""Refuse generation requests while the engine's queue is full, before any other work.

Under overload most requests are refusals. Routed through FastAPI, each refusal still costs
a route match, dependency resolution and body validation: with clients that retry at once,
that work took most of the CPU the engine needed (bench/overload_bench.py --retry-ms 0). This
ASGI middleware answers them first, with the same `queue_full` answer and `Retry-After` as
the route would. It only reads the queue's length; the route's reservation still decides
every request it lets through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine import QueueFullError
from server.http.errors import send_error


class QueueGate:
    def __init__(self, app: ASGIApp, paths: tuple[str, ...]):
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            state = getattr(scope["app"].state, "softprompt", None)
            engine = state.engine if state is not None else None
            if engine is not None and engine.queue_full:
                await send_error(
                    send, scope["path"], QueueFullError(engine.max_queue, engine.max_queue, engine.retry_after)
                )
                return
        await self.app(scope, receive, send)
