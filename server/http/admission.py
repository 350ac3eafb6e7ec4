"""Admission before routing and before the body is read, for the routes that queue engine work.

Under overload most requests are refusals, and routed through FastAPI each would still cost a
route match, dependency resolution and body validation: with clients that retry at once, that
work took most of the CPU the engine needed (bench/overload_bench.py --retry-ms 0). This ASGI
middleware decides first, from the headers alone:

1. who is asking (server/services/tenants.py): a wrong client key is a 401 here;
2. whether that key's limits allow one more request (429 `rate_limited`, Retry-After);
3. whether the queue has a place for that key (its fair share once the queue is full: 503
   `queue_full`, Retry-After; 429 on /v1, as OpenAI's SDKs expect).

A refusal of 2 or 3 is answered at once, except for a key refused more than `refusal_burst`
times within a second: its further refusals are answered after `refusal_delay_ms`, doubled for
each further second the key keeps it up, up to 8 times (sleeping, no CPU), so clients that retry
at once cannot turn the server into a refusal machine. An admitted request carries its key's
name (`scope["state"]["tenant"]`) to the route and counts as in flight until its response ends.
The route's own reservation still decides every request let through.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine import QueueFullError
from server.http.errors import UnauthorizedError, send_error
from server.services.tenants import RateLimitedError

logger = logging.getLogger(__name__)
access = logging.getLogger("softprompt.access")


class AdmissionGate:
    def __init__(self, app: ASGIApp, paths: tuple[str, ...]):
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope["app"].state, "softprompt", None) if scope["type"] == "http" else None
        if state is None or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        tenant = state.tenants.identify(authorization)
        if tenant is None:
            await send_error(
                send,
                scope["path"],
                UnauthorizedError(
                    "This route needs 'Authorization: Bearer <key>' with a client key (SOFTPROMPT_CLIENT_KEYS) or the "
                    "admin key."
                ),
            )
            self._count(state, "unknown", "unauthorized")
            return
        try:
            state.tenants.acquire(tenant)
        except RateLimitedError as error:
            await self._refuse(state, scope, send, tenant, error, error.limit)
            return
        try:
            engine = state.engine
            if engine is not None and engine.refuses(tenant):
                await self._refuse(
                    state,
                    scope,
                    send,
                    tenant,
                    QueueFullError(engine.max_queue, engine.max_queue, engine.retry_after),
                    "queue_full",
                )
                return
            scope.setdefault("state", {})["tenant"] = tenant
            await self._admitted(state, scope, receive, send, tenant)
        finally:
            state.tenants.release(tenant)

    async def _admitted(self, state, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        started, status = time.perf_counter(), 500

        async def tell(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tell)
        finally:
            self._count(state, tenant, None)
            access.info(
                "%s %s %s key=%s %.1f ms",
                scope["method"],
                scope["path"],
                status,
                tenant,
                (time.perf_counter() - started) * 1e3,
            )

    async def _refuse(self, state, scope: Scope, send: Send, tenant: str, error: Exception, reason: str) -> None:
        self._count(state, tenant, reason)
        settings = state.settings
        delay = state.tenants.refusal_delay(tenant, settings.refusal_burst, settings.refusal_delay_ms / 1e3)
        if delay:
            await asyncio.sleep(delay)
        await send_error(send, scope["path"], error)

    @staticmethod
    def _count(state, tenant: str, refused: str | None) -> None:
        if state.metrics is not None:
            state.metrics.count_request(tenant, refused)
