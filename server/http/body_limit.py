"""Request body limits, enforced before a body is read in full.

An ASGI middleware: a declared `Content-Length` over the route's limit is refused at once,
without reading a byte of the body; a chunked body is counted as it arrives and refused as
soon as it passes the limit. Either way the answer is 413 with the limit in the message, and
the route never sees more than `limit` bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import send_error
from server.services.errors import PayloadTooLargeError


class BodySizeLimit:
    """`limit_for(method, path)` gives (limit in bytes, the setting that sets it) for each request."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], tuple[int, str]]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit, setting = self.limit_for(method, path)
        too_large = PayloadTooLargeError(
            limit,
            f"The request body is over {limit} bytes, the limit for {method} {path} "
            f"({setting}); send less, or raise the limit.",
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_error(send, path, too_large, close=True)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await send_error(send, path, too_large, close=True)
                    return {"type": "http.disconnect"}  # the route stops reading; its answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused and not started:
                return  # the 413 went out instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
