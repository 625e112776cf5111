"""Between runs, workers sleep (sandbox.idlewatch, the look in runtime.wire).

A run can leave code behind that runs after its reply, in the worker the
pool then keeps warm. The hostile ways to do it, through the escapes, run
in the hostile harness's throwaway PID namespace (tests/test_hostile.py,
tests/test_unprivileged.py). Here: what a policy allows (a timer handler
where ``signal`` is allowed ends its session with a reason; a patched
``time`` module changes nothing), and workers that sleep between runs, or
wrote a large reply, are kept.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest

from sandbox import Sandbox, SessionLost
from sandbox.policies.model import DEFAULT_ALLOWED_MODULES, DEFAULT_DENIED_MODULES
from tests.conftest import quick_policy
from tests.test_stream import wait_gone

pytestmark = pytest.mark.asyncio(loop_scope="module")

# A run of a tenant whose policy allows ``signal`` that leaves a spinning
# timer handler behind; the hostile variants, through the escapes, are in
# tests/test_hostile.py.
TIMER_LEFT_BEHIND = """
import signal, time
def burn(*_):
    end = time.monotonic() + 0.09
    while time.monotonic() < end:
        pass
signal.signal(signal.SIGALRM, burn)
signal.setitimer(signal.ITIMER_REAL, 0.05, 0.1)
armed = True
"""
SIGNAL_ALLOWED = {
    "allowed_modules": [*DEFAULT_ALLOWED_MODULES, "signal"],
    "denied_modules": [m for m in DEFAULT_DENIED_MODULES if m != "signal"],
}


async def test_a_session_whose_worker_uses_cpu_between_runs_ends_and_says_why():
    async with Sandbox(quick_policy(**SIGNAL_ALLOWED), workers=1) as sb, sb.session() as session:
        result = await session.run(TIMER_LEFT_BEHIND)
        assert result.outputs["armed"] is True
        assert await wait_gone(result.stats.worker_pid, within_s=3.0)
        with pytest.raises(SessionLost, match=r"ended between runs \(after run 1\): it used .* s of CPU while it had"):
            await session.run("x = 1")


async def test_a_patched_time_module_does_not_make_the_worker_look_for_ever():
    """``time`` is an allowed module, and the worker's look for its next run
    is timed with ``perf_counter``: it must be the worker's own, bound at import."""
    async with Sandbox(quick_policy(), workers=1) as sb:
        runs = [await sb.run("import time\ntime.perf_counter = lambda: 0.0\nx = 1") for _ in range(20)]
        worker = psutil.Process(runs[-1].stats.worker_pid)
        before = sum(worker.cpu_times()[:2])
        await asyncio.sleep(0.5)
        assert sum(worker.cpu_times()[:2]) - before < 0.05
        assert (await sb.run("x = 2")).stats.worker_pid == worker.pid


async def test_a_worker_that_sleeps_between_runs_is_kept():
    """The look for the next run (runtime.wire) stays far inside the allowance."""
    async with Sandbox(quick_policy(), workers=1) as sb:
        first = [await sb.run("x = 1") for _ in range(200)]
        await asyncio.sleep(1.0)
        later = await sb.run("x = 2")
        assert {r.stats.worker_pid for r in first} == {later.stats.worker_pid}


async def test_a_worker_that_wrote_a_large_reply_is_kept():
    """Writing a 40 MB reply costs the worker CPU after it measured its run, and is no idle CPU."""
    policy = quick_policy(max_result_bytes=64 * 1024 * 1024, max_reply_bytes=64 * 1024 * 1024)
    async with Sandbox(policy, workers=1) as sb:
        big = await sb.run("data = [bytes([i % 256]) * 1000 for i in range(40_000)]")
        assert len(big.outputs["data"]) == 40_000
        await asyncio.sleep(1.0)
        later = await sb.run("x = 2")
        assert later.stats.worker_pid == big.stats.worker_pid
