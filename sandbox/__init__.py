"""A process-isolated execution sandbox for untrusted Python code nodes.

This package is the trusted host side: the public API below, the
supervisor, the worker pool, the protocol's host end, workflows and the
CLI. What runs inside a worker is ``sandbox.runtime`` (the repository's
``runtime/`` folder) and the policy model is ``sandbox.policies`` (its
``policies/`` folder).

Why the public names are loaded lazily: every worker is forked from a
zygote that imports ``sandbox.runtime``, and importing a subpackage runs
this file first. Were the supervisor, pydantic and uvloop imported here,
each worker would carry them next to hostile code for nothing. So this
module binds nothing at import time; each public name is imported on first
use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    # "X as X": an explicit re-export, which strict type checkers of code using this package require.
    from sandbox.errors import (
        CodeError as CodeError,
        ConfinementUnavailable as ConfinementUnavailable,
        InputError as InputError,
        MemoryLimitExceeded as MemoryLimitExceeded,
        MountError as MountError,
        NodeLost as NodeLost,
        OutputLimitExceeded as OutputLimitExceeded,
        PolicyViolation as PolicyViolation,
        QuotaExceeded as QuotaExceeded,
        SandboxClosed as SandboxClosed,
        SandboxError as SandboxError,
        SessionLost as SessionLost,
        TimeLimitExceeded as TimeLimitExceeded,
        WorkerCrashed as WorkerCrashed,
    )
    from sandbox.opaque import Opaque as Opaque
    from sandbox.policies import (
        Mount as Mount,
        Policy as Policy,
        PolicyFileError as PolicyFileError,
        load_policies as load_policies,
    )
    from sandbox.result import Result as Result, RunStats as RunStats
    from sandbox.session import Session as Session
    from sandbox.stats import SandboxStats as SandboxStats, TenantStats as TenantStats
    from sandbox.stream import Output as Output, RunStream as RunStream
    from sandbox.supervisor import Sandbox as Sandbox, run_sync as run_sync
    from sandbox.workflow import (
        Workflow as Workflow,
        WorkflowBuilder as WorkflowBuilder,
        WorkflowDefinitionError as WorkflowDefinitionError,
        WorkflowError as WorkflowError,
    )

_HOMES = {
    "sandbox.errors": [
        "SandboxError",
        "CodeError",
        "TimeLimitExceeded",
        "MemoryLimitExceeded",
        "OutputLimitExceeded",
        "PolicyViolation",
        "WorkerCrashed",
        "NodeLost",
        "QuotaExceeded",
        "InputError",
        "SandboxClosed",
        "ConfinementUnavailable",
        "SessionLost",
        "MountError",
    ],
    "sandbox.opaque": ["Opaque"],
    "sandbox.policies": ["Policy", "Mount", "load_policies", "PolicyFileError"],
    "sandbox.result": ["Result", "RunStats"],
    "sandbox.session": ["Session"],
    "sandbox.stream": ["Output", "RunStream"],
    "sandbox.stats": ["SandboxStats", "TenantStats"],
    "sandbox.supervisor": ["Sandbox", "run_sync"],
    "sandbox.workflow": ["WorkflowBuilder", "Workflow", "WorkflowError", "WorkflowDefinitionError"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["__version__", *_HOME_OF]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
