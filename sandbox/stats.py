"""Read-only figures about a running Sandbox, for monitoring and for tenants' own usage.

Owns: ``SandboxStats`` and ``TenantStats``, plain snapshots that
``Sandbox.stats()`` fills in from the scheduler and the pool.

Must never: hold a reference into the live scheduler or pool; a snapshot is
copied out, so that reading it can never change what the Sandbox does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantStats:
    """One tenant's load: runs waiting, runs on a worker, and workers it holds (starting ones included)."""

    queued: int
    running: int
    workers: int


_NOTHING = TenantStats(queued=0, running=0, workers=0)


@dataclass(frozen=True)
class SandboxStats:
    """The whole pool: its capacity, its workers by state (``starting``, ``idle``, ``busy``), and its tenants' load.

    ``tenants`` holds the tenants with any load (a run queued or running, or
    a worker held); ``tenant(name)`` answers for any tenant. Why not every
    tenant: a sandbox may serve thousands, and the HTTP service takes a
    snapshot four times a second for its gauges, on the event loop; with
    10,000 tenants configured, a snapshot of all of them and the gauges'
    update took 37 ms each time (docs/BENCHMARKS.md, "The HTTP service's
    gauges with many tenants configured").
    """

    capacity: int
    workers: dict[str, int]
    tenants: dict[str, TenantStats]

    def tenant(self, name: str) -> TenantStats:
        """One tenant's load: all zeros for a tenant that has none."""
        return self.tenants.get(name, _NOTHING)
