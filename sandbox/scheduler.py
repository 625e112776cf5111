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
    def __init__(self, policies: dict[str, Policy]) -> None:
        self.tenants = {name: TenantQueue(name, policy) for name, policy in policies.items()}

    def admit(self, job: Job) -> None:
        """Queue a job, or raise QuotaExceeded without queuing it."""
        tenant = self.tenants[job.tenant]
        self._charge(tenant, len(tenant.queue))
        if not tenant.active:
            floor = min((t.vtime for t in self.tenants.values() if t.active), default=tenant.vtime)
            tenant.vtime = max(tenant.vtime, floor)
        tenant.queue.append(job)

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
        for tenant in self.tenants.values():
            if not (tenant.queue and tenant.under_concurrency_cap and can_serve(tenant)):
                continue
            if best is None or (tenant.vtime, tenant.queue[0].seq) < (best.vtime, best.queue[0].seq):
                best = tenant
        return best

    def fair_share(self, tenant: TenantQueue, capacity: int) -> float:
        """How many of ``capacity`` workers ``tenant`` is due: its weight's
        part among the active tenants (0 when it is not active)."""
        if not tenant.active:
            return 0.0
        total = sum(t.policy.weight for t in self.tenants.values() if t.active)
        return capacity * tenant.policy.weight / total

    def started(self, tenant: TenantQueue) -> Job:
        job = tenant.queue.popleft()
        tenant.in_flight += 1
        tenant.vtime += 1.0 / tenant.policy.weight
        return job

    def finished(self, job: Job) -> None:
        self.tenants[job.tenant].in_flight -= 1

    def withdraw(self, job: Job) -> bool:
        """Remove a queued job (its caller gave up); False if it already started."""
        queue = self.tenants[job.tenant].queue
        try:
            queue.remove(job)
        except ValueError:
            return False
        return True

    def drain(self) -> list[Job]:
        """Remove and return every queued job (shutdown)."""
        jobs = [job for tenant in self.tenants.values() for job in tenant.queue]
        for tenant in self.tenants.values():
            tenant.queue.clear()
        return jobs

    def drain_tenant(self, name: str) -> list[Job]:
        """Remove and return every queued job of one tenant."""
        queue = self.tenants[name].queue
        jobs = list(queue)
        queue.clear()
        return jobs
