"""Which node a run goes to.

Owns: the choice of node for one run of one tenant, among the nodes that
serve that tenant and have a free slot.

Must never: consider a node that refused the tenant (the caller filters
those out) or keep state: the choice is a pure function of the tenant, the
nodes and their load, so any number of clients route alike.

Rendezvous (highest-random-weight) hashing gives each tenant its own order
of the nodes: its first node is its home, where its warm workers are, and
it stays there while the home has a free slot. Nodes joining or leaving
move only the tenants whose home they were. When the home is full the run
spills to the least-loaded node with a free slot (ties broken by the
tenant's order), so load spreads instead of piling onto a second home.
Routing costs no remote call: the client counts each node's runs in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Slots(Protocol):
    node_id: str
    capacity: int
    in_flight: int


N = TypeVar("N", bound="Slots")


def rendezvous_weight(tenant: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{tenant}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose(tenant: str, nodes: Sequence[N]) -> N | None:
    """The node for ``tenant``'s next run, or None if none has a free slot."""
    if not nodes:
        return None
    ranked = sorted(nodes, key=lambda node: rendezvous_weight(tenant, node.node_id), reverse=True)
    home = ranked[0]
    if home.in_flight < home.capacity:
        return home
    free = [node for node in ranked if node.in_flight < node.capacity]
    if not free:
        return None
    return min(free, key=lambda node: node.in_flight / node.capacity)  # min keeps the first of equals
