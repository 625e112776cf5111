"""Sessions held open between requests, each owned by the tenant that made it.

Owns: the ``Sandbox.session()`` contexts that ``POST /v1/sessions`` opened,
their random ids, the per-tenant bound on how many are open, and closing
those left idle past ``idle_s`` (a client that vanished must not hold a
worker for ever).

Must never: hand a session to another tenant (another tenant's id is
answered as an unknown one), or leave a session open after ``close_all``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox.supervisor import Sandbox


@dataclass(eq=False)
class HeldSession:
    id: str
    tenant: str
    session: Any  # sandbox.Session: run(...) and stream(...)
    exit_stack: contextlib.AsyncExitStack
    used_at: float = field(default_factory=time.monotonic)
    busy: int = 0

    def touch(self) -> None:
        self.used_at = time.monotonic()


class TooManySessions(Exception):
    """The tenant already holds its maximum of open sessions."""


class Sessions:
    def __init__(self, sandbox: Sandbox, max_per_tenant: int, idle_s: float) -> None:
        self._sandbox = sandbox
        self.max_per_tenant = max_per_tenant
        self.idle_s = idle_s
        self._held: dict[str, HeldSession] = {}

    async def open(self, tenant: str) -> HeldSession:
        if self.count(tenant) >= self.max_per_tenant:
            raise TooManySessions(
                f"tenant {tenant!r} already has {self.max_per_tenant} open sessions; DELETE one or let one idle out"
            )
        stack = contextlib.AsyncExitStack()
        session = await stack.enter_async_context(self._sandbox.session(tenant=tenant))
        held = HeldSession(secrets.token_urlsafe(16), tenant, session, stack)
        self._held[held.id] = held
        return held

    def count(self, tenant: str) -> int:
        return sum(1 for held in self._held.values() if held.tenant == tenant)

    def get(self, tenant: str, session_id: str) -> HeldSession | None:
        held = self._held.get(session_id)
        return held if held is not None and held.tenant == tenant else None

    async def close(self, held: HeldSession) -> None:
        if self._held.pop(held.id, None) is not None:
            await held.exit_stack.aclose()

    async def close_idle(self) -> None:
        deadline = time.monotonic() - self.idle_s
        for held in [h for h in self._held.values() if h.busy == 0 and h.used_at < deadline]:
            await self.close(held)

    async def close_all(self) -> None:
        for held in list(self._held.values()):
            await self.close(held)
