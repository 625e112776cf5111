"""Workers that use CPU between runs are ended (sandbox.idlewatch).

A run can leave code behind that runs after its reply, in the worker the
pool then keeps warm: a timer's signal handler, a patched function the
worker's own loop calls, a profile hook. These tests leave each behind, and
check from the host that the worker is ended soon, having used little CPU,
and that the tenant's next run gets a new worker, or the session ends
saying why.
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from sandbox import Sandbox, SessionLost
from sandbox.idlewatch import IDLE_CPU_ALLOWANCE_S
from tests.conftest import IS_ROOT, quick_policy
from tests.hostile import attacks
from tests.test_stream import wait_gone

pytestmark = pytest.mark.asyncio(loop_scope="module")

LEFT_BEHIND = {
    "timer-handler": attacks.escaped("subclass_walk", attacks.IDLE_TIMER_HANDLER),
    "spin-after-reply": attacks.escaped("subclass_walk", attacks.SPIN_AFTER_REPLY),
    "profile-hook": attacks.escaped("subclass_walk", attacks.PROFILE_HOOK_SPIN),
    "thread-from-a-later-signal": attacks.escaped("subclass_walk", attacks.THREAD_FROM_A_LATER_SIGNAL),
    "misleading-name": attacks.escaped("subclass_walk", attacks.MISLEADING_NAME_THEN_SPIN),
}


async def _idle_cpu_until_gone(pid: int, within_s: float) -> float | None:
    """CPU seconds ``pid`` used from now until it was gone; None if it outlived ``within_s``."""
    try:
        process = psutil.Process(pid)
        start = last = sum(process.cpu_times()[:2])
    except psutil.NoSuchProcess:
        return 0.0  # ended before the first look
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            last = sum(process.cpu_times()[:2])
            if process.status() == psutil.STATUS_ZOMBIE:
                return last - start
        except psutil.NoSuchProcess:
            return last - start
        await asyncio.sleep(0.01)
    return None


@pytest.mark.parametrize("code", LEFT_BEHIND.values(), ids=LEFT_BEHIND.keys())
async def test_a_warm_worker_that_uses_cpu_between_runs_is_ended(code):
    async with Sandbox(quick_policy(), workers=1) as sb:
        result = await sb.run(code)
        assert result.outputs == {"armed": True}
        used = await _idle_cpu_until_gone(result.stats.worker_pid, within_s=3.0)
        assert used is not None, "the worker kept burning CPU between runs"
        assert used < IDLE_CPU_ALLOWANCE_S + 0.6
        after = await sb.run("x = 1")
        assert after.outputs == {"x": 1} and after.stats.worker_pid != result.stats.worker_pid


@pytest.mark.skipif(not IS_ROOT, reason="processes need PID namespaces and the pids cgroup, as root")
@pytest.mark.parametrize("spin", [True, False], ids=["spinning", "asleep"])
async def test_a_process_left_behind_ends_its_worker_and_goes_with_it(spin):
    policy = quick_policy(allow_processes=True, max_processes=4)
    async with Sandbox(policy, workers=1) as sb:
        code = attacks.escaped("subclass_walk", attacks.LEFTOVER_AFTER_UNDOING_CLEANUP)
        result = await sb.run(code, {"spin": spin})
        assert result.outputs == {"armed": True}
        worker = psutil.Process(result.stats.worker_pid)
        (left,) = worker.children()
        assert await wait_gone(worker.pid, within_s=3.0)
        assert await wait_gone(left.pid, within_s=3.0)
        after = await sb.run("x = 1")
        assert after.outputs == {"x": 1} and after.stats.worker_pid != worker.pid


async def test_a_session_whose_worker_uses_cpu_between_runs_ends_and_says_why():
    async with Sandbox(quick_policy(), workers=1) as sb, sb.session() as session:
        result = await session.run(LEFT_BEHIND["timer-handler"])
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
