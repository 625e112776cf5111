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
import dataclasses
import functools
import signal
from typing import TYPE_CHECKING

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
from sandbox.policies.model import Policy
from sandbox.profile import TenantProfile
from sandbox.result import Result, RunStats
from sandbox.runtime import values, wire
from sandbox.snapshot import Allowance, Budget, decode_value
from sandbox.zygote import ExitInfo

_THREAD_START_FAILED = "can't start new thread"  # threading's RuntimeError when pthread_create fails
_NATIVE_THREADS_FAILED = "pthread_create failed"  # what OpenBLAS writes to stderr before it spins
if TYPE_CHECKING:
    from sandbox.worker import Completed

_DECODE_INLINE_BYTES = 64 * 1024  # larger outputs, and numpy or pandas ones, are decoded in a thread
_BUDGET = Budget()


async def to_result(completed: Completed, profile: TenantProfile) -> Result:
    """Decode a reply into a Result, or raise the error it reports."""
    reply: wire.Reply = completed.reply
    captured = {"stdout": completed.stdout, "stderr": completed.stderr}
    if reply.status != wire.OK:
        raise _reported_error(reply, profile, **captured)
    budget = _budget(profile.policy.max_reply_bytes)
    # Building numpy and pandas values costs library calls, whatever their size: never on the event loop.
    inline = sum(len(blob) for _, _, blob in reply.outputs) <= _DECODE_INLINE_BYTES and not any(
        values.kind_of(blob) is not None for _, _, blob in reply.outputs
    )
    if inline:
        outputs = _decode_all(reply.outputs, budget)
    else:
        outputs = await asyncio.to_thread(_decode_all, reply.outputs, budget)
    stats = RunStats(
        wall_s=completed.wall_s,
        cpu_s=reply.cpu_s,
        peak_memory_bytes=reply.peak_rss,
        worker_pid=completed.worker_pid,
        tenant=profile.name,
    )
    return Result(
        outputs, completed.stdout, completed.stderr, dict(reply.skipped), stats, reply.files, reply.skipped_files
    )


@functools.lru_cache(maxsize=64)
def _budget(max_reply_bytes: int) -> Budget:
    """The decoding budget of a tenant's replies: numpy and pandas values may take its ``max_reply_bytes``."""
    return dataclasses.replace(_BUDGET, max_decoded_bytes=max_reply_bytes)


def _decode_all(outputs: list[tuple[str, str, bytes]], budget: Budget) -> dict[str, object]:
    allowance = Allowance(budget)  # one reply, one budget, however many outputs it splits into
    return {name: decode_value(blob, label, budget, allowance) for name, label, blob in outputs}


def _reported_error(reply: wire.Reply, profile: TenantProfile, **captured: str) -> SandboxError:
    assert reply.error is not None, "wire.decode_reply pairs every non-OK status with an error"
    type_name, message, traceback, detail = reply.error
    policy = profile.policy
    if reply.status == wire.CODE_ERROR:
        if type_name == "RuntimeError" and _THREAD_START_FAILED in message:
            message = f"{message} ({_thread_budget(policy)})"
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
            limit="max_result_bytes" if detail else "max_reply_bytes",
            **captured,
        )
    if reply.status == wire.FILES_LIMIT:
        limit = "max_out_files" if detail == "max_out_files" else "max_out_files_bytes"
        return OutputLimitExceeded(
            f"{message}; leave fewer or smaller files in ./out/ or raise {limit}",
            limit_bytes=policy.max_out_files_bytes if limit == "max_out_files_bytes" else policy.max_out_files,
            limit=limit,
            **captured,
        )
    if detail.startswith("files["):
        return InputError(message, **captured)
    return InputError(f"input {detail!r} could not be loaded in the worker: {message}", **captured)


def wall_timeout(limit_s: float, stdout: str, stderr: str) -> TimeLimitExceeded:
    return TimeLimitExceeded(
        f"run exceeded its wall-clock limit of {limit_s:g} s and was killed",
        kind="wall",
        limit_s=limit_s,
        stdout=stdout,
        stderr=stderr,
    )


def cpu_exceeded(policy: Policy, *, stdout: str, stderr: str) -> TimeLimitExceeded:
    message = f"run exceeded its CPU-time limit of {policy.cpu_time_s:g} s and was stopped"
    if _NATIVE_THREADS_FAILED in stderr:
        # OpenBLAS and friends spin when their threads cannot start: the CPU
        # limit is the symptom, the thread budget the cause.
        message += f"; a native thread pool could not start its threads ({_thread_budget(policy)})"
    return TimeLimitExceeded(message, kind="cpu", limit_s=policy.cpu_time_s, stdout=stdout, stderr=stderr)


def _thread_budget(policy: Policy) -> str:
    return (
        f"the policy allows max_threads = {policy.max_threads} threads per worker; raise max_threads, "
        "or start fewer threads"
    )


def memory_exceeded(limit_mb: int, how: str, **captured: str) -> MemoryLimitExceeded:
    return MemoryLimitExceeded(f"run exceeded its memory limit of {limit_mb} MB ({how})", limit_mb=limit_mb, **captured)


def output_overflow(limit: int, stdout: str, stderr: str) -> OutputLimitExceeded:
    return OutputLimitExceeded(
        f"run wrote more than the {limit} bytes of stdout and stderr its policy allows (max_output_bytes); "
        f"the first {limit} bytes are kept",
        limit_bytes=limit,
        limit="max_output_bytes",
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
        return cpu_exceeded(policy, stdout=stdout, stderr=stderr)
    return WorkerCrashed(
        f"worker process {info.describe()} during the run",
        signal=info.signal,
        exit_code=info.exit_code,
        stdout=stdout,
        stderr=stderr,
    )
