"""A process-isolated execution sandbox for untrusted Python code nodes.

This package is the trusted host side: the public API below, the
supervisor, the worker pool, the protocol's host end, workflows and the
CLI. What runs inside a worker lives in the separate ``runtime`` package,
and the policy model in ``policies``.
"""

from policies import Policy, PolicyFileError, load_policies
from sandbox.errors import (CodeError, ConfinementUnavailable, InputError, MemoryLimitExceeded,
                            OutputLimitExceeded, PolicyViolation, QuotaExceeded, SandboxClosed, SandboxError,
                            TimeLimitExceeded, WorkerCrashed)
from sandbox.opaque import Opaque
from sandbox.result import Result, RunStats
from sandbox.supervisor import Sandbox, run_sync
from sandbox.workflow import Workflow, WorkflowBuilder, WorkflowDefinitionError, WorkflowError

__all__ = [
    "Sandbox", "run_sync", "Policy", "load_policies", "PolicyFileError", "Result", "RunStats", "Opaque",
    "SandboxError", "CodeError", "TimeLimitExceeded", "MemoryLimitExceeded", "OutputLimitExceeded",
    "PolicyViolation", "WorkerCrashed", "QuotaExceeded", "InputError", "SandboxClosed",
    "ConfinementUnavailable", "WorkflowBuilder", "Workflow", "WorkflowError", "WorkflowDefinitionError",
]
