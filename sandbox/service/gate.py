"""What every request passes before the app sees it: draining.

Owns: refusing requests that would start work with 503 while the service
drains, and counting the requests in flight, which the drain waits for.
(The body limit is FastAPI's own ``max_body_size``: Starlette's middleware
answers 413 at once when ``Content-Length`` is over it, else as soon as the
bytes read pass it, so an oversized body is never buffered whole.)

Must never: refuse a request that reads or ends work (GET, DELETE) while
draining: a client must still be able to fetch a polled run's result.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STARTS_WORK = frozenset({"POST", "PUT", "PATCH"})


class Gate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and (scope["method"] in _STARTS_WORK or scope["path"] == "/readyz"):
            await _refuse_while_draining(send)
            return
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


_DRAINING = json.dumps({"detail": "the service is draining (shutting down); retry on another instance"}).encode()


async def _refuse_while_draining(send: Send) -> None:
    body = _DRAINING
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
