"""What every request passes before the app sees it: the body limit and draining.

Owns: refusing a body past ``max_body_bytes`` with 413 (at once when its
``Content-Length`` says so, else as soon as the bytes read so far pass the
limit, so an oversized body is never buffered whole), refusing requests that
would start work with 503 while the service drains, and counting the
requests in flight, which the drain waits for.

Must never: buffer a body itself (it only counts the chunks the app reads),
or refuse a request that reads or ends work (GET, DELETE) while draining:
a client must still be able to fetch a polled run's result.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STARTS_WORK = frozenset({"POST", "PUT", "PATCH"})


class Gate:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and (scope["method"] in _STARTS_WORK or scope["path"] == "/readyz"):
            await _respond(send, 503, "the service is draining (shutting down); retry on another instance")
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await _respond(send, 413, self._too_large())
            return
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        return limited_receive

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes (--max-body-bytes)"

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
