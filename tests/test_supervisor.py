"""The supervisor and pool: time limits, crashes, queueing, cancellation, shutdown, loop health."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import os
import signal
import textwrap
import time

import psutil
import pytest

from sandbox import (
    CodeError,
    Policy,
    QuotaExceeded,
    Sandbox,
    SandboxClosed,
    SandboxError,
    TimeLimitExceeded,
    WorkerCrashed,
    leftovers,
    run_sync,
)
from tests.conftest import descendants, quick_policy
from tests.hostile.attacks import ESCAPES

# Code that gets `os`/`signal` despite the allowlist, the way attackers do;
# the OS-level confinement is what these tests lean on.
ESCAPE = ESCAPES["subclass_walk"]


class LagMonitor:
    """Measures how late the event loop wakes a task that sleeps 5 ms at a time."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> LagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - start - 0.005)


async def test_every_kind_of_stuck_code_ends_at_its_wall_limit(sandbox):
    stuck = {
        "blocking sleep": "import time\ntime.sleep(3600)",
        "spinning": "while True:\n    pass",
        "signal ignoring": ESCAPE
        + textwrap.dedent("""
            signal = _mod("signal")
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU):
                signal.signal(s, signal.SIG_IGN)
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass
        """),
        "cancel swallowing": textwrap.dedent("""
            while True:
                try:
                    await asyncio.sleep(10)
                except BaseException:
                    pass
        """),
        "self stopped": ESCAPE + "os = _mod('os')\nos.kill(os.getpid(), 19)",
    }

    async def one(code):
        start = time.monotonic()
        with pytest.raises(TimeLimitExceeded) as info:
            await sandbox.run(code, timeout=0.6)
        return info.value, time.monotonic() - start

    results = await asyncio.gather(*(one(code) for code in stuck.values()))
    for (error, elapsed), name in zip(results, stuck, strict=False):
        assert error.kind == "wall" and error.limit_s == 0.6, name
        assert 0.55 < elapsed < 2.0, f"{name} ended after {elapsed:.2f}s"
    r = await sandbox.run("ok = True")
    assert r.outputs == {"ok": True}


async def test_timeout_shortens_but_never_extends_the_policy():
    async with Sandbox(quick_policy(wall_time_s=0.5), workers=1) as sb:
        start = time.monotonic()
        with pytest.raises(TimeLimitExceeded) as info:
            await sb.run("import time\ntime.sleep(60)", timeout=30)
        assert info.value.limit_s == 0.5
        assert time.monotonic() - start < 2.0
        with pytest.raises(SandboxError, match="timeout must be a positive"):
            await sb.run("x = 1", timeout=0)


async def test_cpu_limit_is_separate_from_wall_time():
    async with Sandbox(quick_policy(wall_time_s=10, cpu_time_s=0.5), workers=1) as sb:
        start = time.monotonic()
        with pytest.raises(TimeLimitExceeded) as info:
            await sb.run("while True:\n    pass")
        assert info.value.kind == "cpu"
        assert time.monotonic() - start < 4.0
        assert (await sb.run("x = 1")).outputs == {"x": 1}


@pytest.mark.parametrize(
    "code, signal_number, exit_code",
    [
        (ESCAPE + "_mod('os')._exit(3)", None, 3),
        (ESCAPE + "ctypes = _mod('ctypes')\nctypes.string_at(0)", 11, None),
        (ESCAPE + "os = _mod('os')\nos.abort()", 6, None),
    ],
)
async def test_a_crashing_worker_names_how_it_died_and_the_pool_heals(sandbox, code, signal_number, exit_code):
    with pytest.raises(WorkerCrashed) as info:
        await sandbox.run(code)
    assert info.value.signal == signal_number
    assert info.value.exit_code == exit_code
    assert not info.value.protocol_violation
    results = await asyncio.gather(*(sandbox.run("v = i * 2", {"i": i}) for i in range(6)))
    assert [r.outputs["v"] for r in results] == [0, 2, 4, 6, 8, 10]


async def test_500_concurrent_runs_all_get_their_own_correct_outputs():
    async with Sandbox(quick_policy(), workers=2) as sb:
        code = "import hashlib\ndigest = hashlib.sha256(str(n).encode()).hexdigest()\ndouble = n * 2"
        results = await asyncio.gather(*(sb.run(code, {"n": n}) for n in range(500)))
    for n, r in enumerate(results):
        assert r.outputs == {"digest": hashlib.sha256(str(n).encode()).hexdigest(), "double": n * 2}


async def test_queue_is_fifo_and_bounded():
    async with Sandbox(quick_policy(max_queued=3), workers=1) as sb:
        order: list[int] = []

        async def tracked(i):
            r = await sb.run("import time\ntime.sleep(0.05)\nv = i", {"i": i})
            order.append(r.outputs["v"])

        tasks = [asyncio.ensure_future(tracked(i)) for i in range(4)]
        await asyncio.sleep(0)  # all four submitted: one running, three queued
        with pytest.raises(QuotaExceeded) as info:
            await sb.run("x = 1")
        assert info.value.quota == "max_queued"
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]


async def test_cancelling_a_running_run_kills_its_worker_and_frees_the_slot():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        task = asyncio.ensure_future(sb.run("while True:\n    pass"))
        await asyncio.sleep(0.3)
        busy_pid = next(iter(sb._running.values())).pid
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        start = time.monotonic()
        r = await sb.run("x = 1")
        assert r.outputs == {"x": 1} and r.stats.worker_pid != busy_pid
        assert time.monotonic() - start < 2.0


async def test_cancelling_a_queued_run_removes_it():
    async with Sandbox(quick_policy(), workers=1) as sb:
        blocker = asyncio.ensure_future(sb.run("import time\ntime.sleep(0.3)\nfirst = True"))
        queued = asyncio.ensure_future(sb.run("never = True"))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert (await blocker).outputs == {"first": True}
        assert sum(len(t.queue) for t in sb._scheduler.tenants.values()) == 0


async def test_leaving_the_sandbox_fails_waiting_runs_and_leaves_no_process():
    sb = Sandbox(quick_policy(wall_time_s=30), workers=1)
    await sb.start()
    running = asyncio.ensure_future(sb.run("while True:\n    pass"))
    queued = asyncio.ensure_future(sb.run("x = 1"))
    await asyncio.sleep(0.2)
    assert descendants(), "the pool should have processes while open"
    await sb.close()
    for task in (running, queued):
        with pytest.raises(SandboxClosed):
            await task
    with pytest.raises(SandboxClosed):
        await sb.run("x = 1")
    deadline = time.monotonic() + 3
    while descendants() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert descendants() == []


async def test_close_returns_once_every_host_scratch_directory_is_gone():
    """The zygote removes what its workers owned on the host before close() returns,
    even when a worker exit is still being reported as the supervisor hangs up."""
    pattern = os.path.join(leftovers.HOST_TMP, f"sandbox-w*-{leftovers.owner_tag()}-*")  # ours, not other tests'
    before = set(glob.glob(pattern))
    for _ in range(4):
        # Only a worker that may run without its own mount namespace (and so
        # without landlock) has a directory on the host.
        async with Sandbox(quick_policy(skip_layers=["mountns", "landlock"]), workers=2) as sb:
            for _ in range(10):
                await sb.run("x = 1")
            with pytest.raises(WorkerCrashed):
                await sb.run(ESCAPE + "_mod('os')._exit(3)")
            assert set(glob.glob(pattern)) - before, "each worker should have a host scratch directory"
        assert set(glob.glob(pattern)) - before == set()


async def test_a_worker_that_requires_its_mount_namespace_has_no_directory_on_the_host():
    """It never falls back to one (its confinement fails instead), so none is made and removed per start."""
    pattern = os.path.join(leftovers.HOST_TMP, f"sandbox-w*-{leftovers.owner_tag()}-*")
    async with Sandbox(quick_policy(fresh_process_per_run=True), workers=2) as sb:
        if "mountns" not in sb._profiles["default"].required:
            pytest.skip("this host cannot give workers a mount namespace of their own")
        for _ in range(5):
            assert (await sb.run("x = 1")).outputs == {"x": 1}
            assert glob.glob(pattern) == []


async def test_a_killed_init_forker_is_replaced_and_workers_go_on_starting():
    """The zygote starts a new init forker when the old one is gone; the pairs the old
    one made go on serving, their inits now reaped by the zygote."""
    async with Sandbox(quick_policy(fresh_process_per_run=True), workers=2) as sb:
        await sb.run("x = 1")
        if not sb.host.pid_namespace:
            pytest.skip("this host cannot give workers a PID namespace of their own")
        (zygote,) = psutil.Process(sb._pool._zygote._process.pid).children()  # the launcher's one child

        def forkers() -> list[int]:  # the zygote's children that fork inits
            named = []
            for child in zygote.children():
                with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just ended
                    if child.name() == "sandbox-inits":
                        named.append(child.pid)
            return named

        (old,) = forkers()
        os.kill(old, 9)
        for _ in range(8):  # more than the spares and standbys forked before the kill
            result = await sb.run(ESCAPE + "x = _mod('os').getpid()", timeout=10)
            assert result.outputs["x"] == 2  # pid 2 of a namespace of its own, under a new init
        (new,) = forkers()
        assert new != old


async def test_an_init_handles_no_signal_so_no_process_of_its_namespace_can_signal_it():
    """A namespace's init gets, from processes inside it, only the signals it has a
    handler for. (Where the kernel has Landlock ABI 6, its signal scope refuses a
    worker's signals to the init first, so the hostile tests cannot tell this layer apart.)"""
    async with Sandbox(quick_policy(), workers=2) as sb:
        await sb.run("x = 1")
        if not sb.host.pid_namespace:
            pytest.skip("this host cannot give workers a PID namespace of their own")
        inits = [p.pid for p in descendants() if p.name() == "sandbox-init"]
        assert inits  # the live workers' and the standbys'
        for pid in inits:
            with open(f"/proc/{pid}/status") as f:
                fields = (line.partition(":\t") for line in f)
                masks = {key: int(value, 16) for key, _, value in fields if key in ("SigBlk", "SigIgn", "SigCgt")}
            assert masks["SigCgt"] == 0, f"init {pid} catches signals {masks['SigCgt']:x}"
            assert masks["SigBlk"] == 0, f"init {pid} blocks signals {masks['SigBlk']:x}"
            # SIGCHLD ignored, so that the kernel reaps the run's orphans at once.
            assert masks["SigIgn"] & (1 << (signal.SIGCHLD - 1)), f"init {pid} does not ignore SIGCHLD"


async def test_event_loop_stays_responsive_while_workers_spin():
    async with Sandbox(quick_policy(wall_time_s=1.0), workers=2) as sb:
        async with LagMonitor() as lag:
            spinning = [sb.run("while True:\n    pass") for _ in range(4)]
            outcomes = await asyncio.gather(*spinning, return_exceptions=True)
            trivial = await asyncio.gather(*(sb.run("x = 1") for _ in range(50)))
        assert all(isinstance(o, TimeLimitExceeded) for o in outcomes)
        assert len(trivial) == 50
        assert lag.worst < 0.05, f"event loop lagged {lag.worst * 1000:.1f} ms"


async def test_blocked_workers_do_not_delay_runs_on_other_workers():
    async with Sandbox(quick_policy(wall_time_s=2.0), workers=2) as sb:
        stuck = asyncio.ensure_future(sb.run("import time\ntime.sleep(60)"))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        results = [await sb.run("x = 1") for _ in range(20)]
        assert time.monotonic() - start < 1.5
        assert all(r.outputs == {"x": 1} for r in results)
        with pytest.raises(TimeLimitExceeded):
            await stuck


async def test_a_worker_between_runs_looks_for_the_next_one_only_briefly():
    """Back-to-back runs make a worker look for its next request before it
    sleeps (runtime.wire.FrameReader); once they stop, it must sleep."""
    async with Sandbox(quick_policy(), workers=1) as sb:
        results = [await sb.run("x = 1") for _ in range(50)]
        assert {r.stats.worker_pid for r in results} == {results[0].stats.worker_pid}
        worker = psutil.Process(results[0].stats.worker_pid)
        before = sum(worker.cpu_times()[:2])
        await asyncio.sleep(0.5)
        assert sum(worker.cpu_times()[:2]) - before < 0.02
        assert (await sb.run("x = 2")).outputs == {"x": 2}


def test_works_on_a_plain_asyncio_loop_too():
    async def scenario():
        async with Sandbox(quick_policy(), workers=1) as sb:
            return await sb.run("y = x + 1", {"x": 1})

    assert asyncio.run(scenario()).outputs == {"y": 2}


def test_run_sync_runs_its_own_loop():
    assert run_sync("y = x * 3", {"x": 2}, policy=Policy(wall_time_s=5)).outputs == {"y": 6}


async def test_a_sandbox_cannot_be_used_before_start_or_started_twice():
    sb = Sandbox(quick_policy(), workers=1)
    with pytest.raises(SandboxClosed):
        await sb.run("x = 1")
    async with sb:
        with pytest.raises(SandboxError, match="only once"):
            await sb.start()


async def test_constructor_rejects_ambiguous_or_invalid_arguments():
    with pytest.raises(SandboxError, match="either as policy"):
        Sandbox(Policy(), tenants={"default": Policy()})
    with pytest.raises(SandboxError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(SandboxError, match="expected a Policy"):
        Sandbox(tenants={"a": {"wall_time_s": 1}})


async def test_code_errors_do_not_cost_a_worker(sandbox):
    pids = set()
    for _ in range(6):
        with pytest.raises(CodeError):
            await sandbox.run("raise ValueError('x')")
        pids.add((await sandbox.run("x = 1")).stats.worker_pid)
    assert len(pids) <= 2
