"""Scale out on Ray: ``ClusterSandbox``, the ``Sandbox`` API over a cluster's nodes.

Needs the ``[cluster]`` extra (Ray). Nothing here is imported by ``import
sandbox``; and this package itself imports ray only when ``ClusterSandbox``
is first used, because the node supervisor (``sandbox.cluster.node``) runs
next to workers and has no use for it.

::

    client (ClusterSandbox: quotas, fair share, routing)
      ├── Ray actor: NodeAgent on node A ── Unix socket ── node supervisor (Sandbox) ── workers
      └── Ray actor: NodeAgent on node B ── Unix socket ── node supervisor (Sandbox) ── workers
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.cluster.client import ClusterSandbox, Node
    from sandbox.errors import NodeLost

_HOME_OF = {"ClusterSandbox": "sandbox.cluster.client", "Node": "sandbox.cluster.client", "NodeLost": "sandbox.errors"}

__all__ = list(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
