"""Turn what happened to a run into the one thing its caller receives.

Owns: every message a user reads when a run fails, and the conversion of a
validated reply into a ``Result`` (decoding each output with
``sandbox.snapshot``, off the event loop when the values are large).

Must never: trust the worker's account of *why* it failed beyond its own
run: a reply can claim any status, but it can only describe the run that
produced it, and its text fields are already bounded by the wire decoder.
"""

from __future__ import annotations

import asyncio
import signal

from sandbox.errors import (
    CodeError,
    InputError,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    PolicyViolation,
    SandboxError,
    TimeLimitExceeded,
    WorkerCrashed,
)
from sandbox.profile import TenantProfile
from sandbox.result import Result, RunStats
from sandbox.runtime import wire
from sandbox.snapshot import Allowance, Budget, decode_value
from sandbox.zygote import ExitInfo

_DECODE_INLINE_BYTES = 64 * 1024  # larger outputs are decoded in a thread
_BUDGET = Budget()


async def to_result(completed, profile: TenantProfile) -> Result:
    """Decode a reply into a Result, or raise the error it reports."""
    reply: wire.Reply = completed.reply
    captured = {"stdout": completed.stdout, "stderr": completed.stderr}
    if reply.status != wire.OK:
        raise _reported_error(reply, profile, **captured)
    if sum(len(blob) for _, _, blob in reply.outputs) <= _DECODE_INLINE_BYTES:
        outputs = _decode_all(reply.outputs)
    else:
        outputs = await asyncio.to_thread(_decode_all, reply.outputs)
    stats = RunStats(
        wall_s=completed.wall_s,
        cpu_s=reply.cpu_s,
        peak_memory_bytes=reply.peak_rss,
        worker_pid=completed.worker_pid,
        tenant=profile.name,
    )
    return Result(outputs, completed.stdout, completed.stderr, dict(reply.skipped), stats)


def _decode_all(outputs: list[tuple[str, str, bytes]]) -> dict[str, object]:
    allowance = Allowance(_BUDGET)  # one reply, one budget, however many outputs it splits into
    return {name: decode_value(blob, label, _BUDGET, allowance) for name, label, blob in outputs}


def _reported_error(reply: wire.Reply, profile: TenantProfile, **captured: str) -> SandboxError:
    type_name, message, traceback, detail = reply.error
    policy = profile.policy
    if reply.status == wire.CODE_ERROR:
        return CodeError(type_name, message, traceback, **captured)
    if reply.status == wire.MEMORY_LIMIT:
        return memory_exceeded(policy.memory_mb, "the code ran out of memory", **captured)
    if reply.status == wire.POLICY_VIOLATION:
        return PolicyViolation(message, tenant=profile.name, module=detail or None, **captured)
    if reply.status == wire.OUTPUT_LIMIT:
        return OutputLimitExceeded(
            f"{message}; return less data or raise the limit",
            limit_bytes=policy.max_result_bytes,
            variable=detail or None,
            **captured,
        )
    return InputError(f"input {detail!r} could not be loaded in the worker: {message}", **captured)


def wall_timeout(limit_s: float, stdout: str, stderr: str) -> TimeLimitExceeded:
    return TimeLimitExceeded(
        f"run exceeded its wall-clock limit of {limit_s:g} s and was killed",
        kind="wall",
        limit_s=limit_s,
        stdout=stdout,
        stderr=stderr,
    )


def cpu_exceeded(limit_s: float, **captured: str) -> TimeLimitExceeded:
    return TimeLimitExceeded(
        f"run exceeded its CPU-time limit of {limit_s:g} s and was stopped", kind="cpu", limit_s=limit_s, **captured
    )


def memory_exceeded(limit_mb: int, how: str, **captured: str) -> MemoryLimitExceeded:
    return MemoryLimitExceeded(f"run exceeded its memory limit of {limit_mb} MB ({how})", limit_mb=limit_mb, **captured)


def output_overflow(limit: int, stdout: str, stderr: str) -> OutputLimitExceeded:
    return OutputLimitExceeded(
        f"run wrote more than the {limit} bytes of stdout and stderr its policy allows (max_output_bytes); "
        f"the first {limit} bytes are kept",
        limit_bytes=limit,
        stdout=stdout,
        stderr=stderr,
    )


def protocol_violation(detail: str, stdout: str, stderr: str) -> WorkerCrashed:
    return WorkerCrashed(
        f"worker was killed for a protocol violation: {detail}", protocol_violation=True, stdout=stdout, stderr=stderr
    )


def channel_closed(stdout: str, stderr: str) -> WorkerCrashed:
    return WorkerCrashed(
        "the run closed or replaced its channel to the supervisor (fd 3), so it could not "
        "report; its worker was stopped",
        stdout=stdout,
        stderr=stderr,
    )


def worker_died(info: ExitInfo | None, profile: TenantProfile, stdout: str, stderr: str) -> SandboxError:
    """Explain a worker that died on its own in the middle of a run."""
    policy = profile.policy
    if info is None:
        return WorkerCrashed(
            "worker process ended during the run (no exit status was reported)", stdout=stdout, stderr=stderr
        )
    if info.exit_code == wire.EXIT_CHANNEL_LOST:
        return channel_closed(stdout, stderr)
    if info.oom_killed:
        return memory_exceeded(policy.memory_mb, "killed by the kernel's OOM killer", stdout=stdout, stderr=stderr)
    cpu_hard_limit = profile.template["rlimits"]["cpu"][1]
    if info.signal in (signal.SIGKILL, signal.SIGXCPU) and info.cpu_s >= cpu_hard_limit - 0.05:
        return cpu_exceeded(policy.cpu_time_s, stdout=stdout, stderr=stderr)
    return WorkerCrashed(
        f"worker process {info.describe()} during the run",
        signal=info.signal,
        exit_code=info.exit_code,
        stdout=stdout,
        stderr=stderr,
    )
