"""Per-tenant queues, quotas and fair share.

Owns: admission (``max_queued`` and the ``rate_per_s``/``burst`` token
bucket, both answered at once with ``QuotaExceeded``, like an HTTP 429),
FIFO order within a tenant, ``max_concurrency``, and which tenant is served
next when capacity frees up.

Must never: start work itself or know about processes. The supervisor asks
``pick`` for the next tenant that may run and reports back with
``started``/``finished``.

Fairness is start-time fair queuing over runs: each tenant has a virtual
time that advances by ``1 / weight`` per run started, and the eligible
tenant with the smallest virtual time goes next (ties by the age of its
oldest waiting run). A tenant that becomes active again starts at the
current minimum, so idling earns no credit and flooding earns no priority:
a tenant with 10,000 queued runs and a tenant with one alternate, and the
single run waits for about one run of the flood, not for all of it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sandbox.errors import QuotaExceeded
from sandbox.job import Job
from sandbox.policies.model import Policy


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: int
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(eq=False)
class TenantQueue:
    name: str
    policy: Policy
    queue: deque[Job] = field(default_factory=deque)
    in_flight: int = 0
    sessions: int = 0  # open sessions; each holds a worker, and a place under max_concurrency, for its life
    vtime: float = 0.0
    bucket: TokenBucket | None = None

    def __post_init__(self) -> None:
        if self.policy.rate_per_s is not None:
            self.bucket = TokenBucket(self.policy.rate_per_s, self.policy.burst)

    @property
    def active(self) -> bool:
        return bool(self.queue) or self.in_flight > 0

    @property
    def under_concurrency_cap(self) -> bool:
        cap = self.policy.max_concurrency
        return cap is None or self.in_flight + self.sessions < cap


class Scheduler:
    """Every question here costs in proportion to the tenants with work, not
    to all tenants: a sandbox may serve thousands of tenants of which only
    a few have a run queued at any moment."""

    def __init__(self, policies: dict[str, Policy]) -> None:
        self.tenants = {name: TenantQueue(name, policy) for name, policy in policies.items()}
        self._waiting: dict[str, TenantQueue] = {}  # tenants with a queued run
        self._active: dict[str, TenantQueue] = {}  # tenants with a queued or running run

    def admit(self, job: Job) -> None:
        """Queue a job, or raise QuotaExceeded without queuing it."""
        tenant = self.tenants[job.tenant]
        self._charge(tenant, len(tenant.queue))
        if not tenant.active:
            floor = min((t.vtime for t in self._active.values()), default=tenant.vtime)
            tenant.vtime = max(tenant.vtime, floor)
            self._active[tenant.name] = tenant
        tenant.queue.append(job)
        self._waiting[tenant.name] = tenant

    def admit_elsewhere(self, name: str, waiting: int) -> None:
        """Charge a run that waits somewhere else (behind ``waiting`` runs of a
        session) against the tenant's ``max_queued`` and rate, as ``admit`` does."""
        self._charge(self.tenants[name], waiting)

    def _charge(self, tenant: TenantQueue, waiting: int) -> None:
        policy = tenant.policy
        if waiting >= policy.max_queued:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} already has {waiting} runs queued (max_queued); retry later",
                tenant=tenant.name,
                quota="max_queued",
            )
        if tenant.bucket is not None and not tenant.bucket.take():
            raise QuotaExceeded(
                f"tenant {tenant.name!r} is over its rate of {policy.rate_per_s:g} runs/s "
                f"(burst {policy.burst}); retry later",
                tenant=tenant.name,
                quota="rate",
            )

    def pick(self, can_serve: Callable[[TenantQueue], bool]) -> TenantQueue | None:
        """The tenant whose next run should start now, among those ``can_serve`` accepts."""
        best = None
        for tenant in self._waiting.values():
            if not (tenant.under_concurrency_cap and can_serve(tenant)):
                continue
            if best is None or (tenant.vtime, tenant.queue[0].seq) < (best.vtime, best.queue[0].seq):
                best = tenant
        return best

    def started(self, tenant: TenantQueue) -> Job:
        job = tenant.queue.popleft()
        if not tenant.queue:
            del self._waiting[tenant.name]
        tenant.in_flight += 1
        tenant.vtime += 1.0 / tenant.policy.weight
        return job

    def finished(self, job: Job) -> None:
        tenant = self.tenants[job.tenant]
        tenant.in_flight -= 1
        self._settle(tenant)

    def _settle(self, tenant: TenantQueue) -> None:
        """Drop ``tenant`` from the waiting and active sets it no longer belongs to."""
        if not tenant.queue:
            self._waiting.pop(tenant.name, None)
            if not tenant.in_flight:
                self._active.pop(tenant.name, None)

    def withdraw(self, job: Job) -> bool:
        """Remove a queued job (its caller gave up); False if it already started."""
        tenant = self.tenants[job.tenant]
        try:
            tenant.queue.remove(job)
        except ValueError:
            return False
        self._settle(tenant)
        return True

    def drain(self) -> list[Job]:
        """Remove and return every queued job (shutdown)."""
        waiting = list(self._waiting.values())
        jobs = [job for tenant in waiting for job in tenant.queue]
        for tenant in waiting:
            tenant.queue.clear()
            self._settle(tenant)
        return jobs

    def drain_tenant(self, name: str) -> list[Job]:
        """Remove and return every queued job of one tenant."""
        tenant = self.tenants[name]
        jobs = list(tenant.queue)
        tenant.queue.clear()
        self._settle(tenant)
        return jobs
