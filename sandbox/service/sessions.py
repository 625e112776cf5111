"""Sessions held open between requests, each owned by the tenant that made it.

Owns: the ``Sandbox.session()`` contexts that ``POST /v1/sessions`` opened,
their random ids, and forgetting those that have ended. The limits are the
tenant's policy, enforced by the Sandbox itself (``max_sessions``,
``session_idle_s``, ``session_max_s``): a client that vanished holds a
worker only until its session idles out, and its record goes at the next
prune.

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


class Sessions:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._held: dict[str, HeldSession] = {}

    async def open(self, tenant: str) -> HeldSession:
        """A new session; QuotaExceeded (429) past the tenant's ``max_sessions``."""
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

    async def prune_ended(self) -> None:
        """Forget sessions the Sandbox has ended (idle, lifetime, a lost worker)."""
        for held in [h for h in self._held.values() if h.busy == 0 and h.session.ended is not None]:
            await self.close(held)

    async def close_all(self) -> None:
        for held in list(self._held.values()):
            await self.close(held)
