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

Why gates: the supervisor asks for the next tenant every time a run is
submitted or ends, and most of those questions have no answer (every
running slot is taken). Asking each waiting tenant "can you be served?"
made every such question, and so every run, cost in proportion to the
tenants waiting: with 1,000 tenants waiting the supervisor spent 2.5 ms of
CPU per run, against 0.7 ms now (docs/BENCHMARKS.md, "Tenants waiting at
once"). Instead the caller names, for each waiting tenant, the one shared resource
its next run waits for (its *gate*: a free running slot, room to start a
worker, a node with room), and tenants are kept in one heap per gate,
ordered by (virtual time, age of the oldest run). A question then looks at
the top of each open gate's heap: O(gates + log tenants). A tenant's gate
is worked out again only when something about that tenant changes, which
the caller reports with ``touch`` (the scheduler's own changes touch it
themselves); a tenant whose gate is ``None`` waits for such a change alone
(its concurrency cap, or workers already starting for it). Heap entries
made stale by a change are skipped when they reach the top.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
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
    gate: Hashable | None = None  # what its next run waits for, while it has one queued
    key: tuple[float, int] = (0.0, 0)  # the fair-share order of its live heap entry, while it has a gate
    version: int = 0  # bumped whenever it moves in the heaps: older heap entries are stale

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


# A heap entry: (virtual time, sequence number of the oldest queued run, the
# tenant's version when it was pushed, the tenant). The first two are the
# fair-share order; sequence numbers are unique, so tenants never compare.
_Entry = tuple[float, int, int, TenantQueue]
# Heaps are rebuilt without their stale entries when they grow past this
# many entries per tenant waiting (plus a constant): memory stays in
# proportion to the tenants waiting, and each rebuild is paid for by the
# pushes before it.
_STALE_FACTOR = 2
_STALE_SLACK = 64


class Scheduler:
    """Every question here costs in proportion to the tenants a change
    concerns, not to all tenants and not to all waiting ones: a sandbox may
    serve thousands of tenants, and many of them may have runs queued at
    once (see "Why gates" above)."""

    def __init__(self, policies: dict[str, Policy]) -> None:
        self.tenants = {name: TenantQueue(name, policy) for name, policy in policies.items()}
        self._waiting: dict[str, TenantQueue] = {}  # tenants with a queued run
        self._active: dict[str, TenantQueue] = {}  # tenants with a queued or running run
        self.active_fresh: dict[str, TenantQueue] = {}  # the active ones whose policy wants a new process per run
        self._gates: dict[Hashable, list[_Entry]] = {}  # waiting tenants by gate, each heap in fair-share order
        self._touched: dict[str, TenantQueue] = {}  # tenants whose gate must be worked out again
        # Active tenants by virtual time, for the floor a newly active tenant starts at;
        # an entry is stale once its tenant is inactive or has moved on.
        self._vtimes: list[tuple[float, int, TenantQueue]] = []
        self._pushes = itertools.count()  # ties in ``_vtimes``: its entries never compare tenants

    def admit(self, job: Job) -> None:
        """Queue a job, or raise QuotaExceeded without queuing it."""
        tenant = self.tenants[job.tenant]
        self._charge(tenant, len(tenant.queue))
        if not tenant.active:
            tenant.vtime = max(tenant.vtime, self._floor(tenant.vtime))
            self._active[tenant.name] = tenant
            if tenant.policy.fresh_process_per_run:
                self.active_fresh[tenant.name] = tenant
            self._note_vtime(tenant)
        tenant.queue.append(job)
        self._waiting[tenant.name] = tenant
        self._touched[tenant.name] = tenant

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

    def active_tenants(self) -> Iterable[TenantQueue]:
        """The tenants with a run queued or running."""
        return self._active.values()

    def touch(self, name: str) -> None:
        """Something the gate of tenant ``name`` depends on changed (its workers, its sessions)."""
        self._touched[name] = self.tenants[name]

    def touch_all(self) -> None:
        """Something every waiting tenant's gate may depend on changed (the nodes serving them)."""
        self._touched.update(self._waiting)

    def pick(
        self, gate_of: Callable[[TenantQueue], Hashable | None], is_open: Callable[[Hashable], bool]
    ) -> TenantQueue | None:
        """The tenant whose next run should start now: the first in fair-share
        order among the tenants behind an open gate.

        ``gate_of(tenant)`` names what a waiting tenant's next run waits
        for, or None when it waits for a change of its own; it is asked
        again only for tenants touched since. ``is_open(gate)`` says whether
        that resource is free now.
        """
        if self._touched:
            touched, self._touched = self._touched, {}
            for tenant in touched.values():
                self._place(tenant, gate_of(tenant) if tenant.queue and tenant.under_concurrency_cap else None)
        best: _Entry | None = None
        for gate, heap in self._gates.items():
            while heap and heap[0][2] != heap[0][3].version:
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best) and is_open(gate):
                best = heap[0]
        return None if best is None else best[3]

    def _place(self, tenant: TenantQueue, gate: Hashable | None) -> None:
        """Put ``tenant`` behind ``gate``; its entries behind any other gate are stale from now on.

        Most touches change nothing the heaps hold (a run finished, but the
        tenant still waits behind the same gate, in the same place): its
        live entry then stays, and nothing is pushed.
        """
        if gate is None:
            if tenant.gate is not None:
                tenant.gate = None
                tenant.version += 1
            return
        key = (tenant.vtime, tenant.queue[0].seq)
        if gate == tenant.gate and key == tenant.key:
            return
        tenant.version += 1
        tenant.gate, tenant.key = gate, key
        heap = self._gates.setdefault(gate, [])
        heapq.heappush(heap, (key[0], key[1], tenant.version, tenant))
        # A tenant has one live entry at most, so every heap's live ones are
        # fewer than the tenants waiting.
        if len(heap) > _STALE_FACTOR * len(self._waiting) + _STALE_SLACK:
            heap[:] = [entry for entry in heap if entry[2] == entry[3].version]
            heapq.heapify(heap)

    def _floor(self, default: float) -> float:
        """The smallest virtual time among active tenants, or ``default`` when none is active."""
        heap = self._vtimes
        while heap and (heap[0][2].name not in self._active or heap[0][0] != heap[0][2].vtime):
            heapq.heappop(heap)
        return heap[0][0] if heap else default

    def _note_vtime(self, tenant: TenantQueue) -> None:
        heap = self._vtimes
        heapq.heappush(heap, (tenant.vtime, next(self._pushes), tenant))
        if len(heap) > _STALE_FACTOR * len(self._active) + _STALE_SLACK:
            heap[:] = [(t.vtime, next(self._pushes), t) for t in self._active.values()]
            heapq.heapify(heap)

    def started(self, tenant: TenantQueue) -> Job:
        job = tenant.queue.popleft()
        if not tenant.queue:
            del self._waiting[tenant.name]
        tenant.in_flight += 1
        tenant.vtime += 1.0 / tenant.policy.weight
        self._note_vtime(tenant)
        self._touched[tenant.name] = tenant
        return job

    def finished(self, job: Job) -> None:
        tenant = self.tenants[job.tenant]
        tenant.in_flight -= 1
        self._settle(tenant)

    def _settle(self, tenant: TenantQueue) -> None:
        """Drop ``tenant`` from the waiting and active sets it no longer belongs to; its gate is worked out again."""
        self._touched[tenant.name] = tenant
        if not tenant.queue:
            self._waiting.pop(tenant.name, None)
            if not tenant.in_flight:
                self._active.pop(tenant.name, None)
                self.active_fresh.pop(tenant.name, None)

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
