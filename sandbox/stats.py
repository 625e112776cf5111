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


@dataclass(frozen=True)
class SandboxStats:
    """The whole pool: its capacity, its workers by state (``starting``, ``idle``, ``busy``), and each tenant."""

    capacity: int
    workers: dict[str, int]
    tenants: dict[str, TenantStats]
