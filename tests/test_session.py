"""Sessions: state kept in one dedicated worker, run order, isolation, capacity, limits, loss and close."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import textwrap
import time

import pytest

from sandbox import (
    CodeError,
    QuotaExceeded,
    Sandbox,
    SandboxClosed,
    SandboxError,
    Session,
    SessionLost,
    TimeLimitExceeded,
    WorkerCrashed,
)
from tests.conftest import IS_ROOT, REPO, quick_policy
from tests.hostile.attacks import ESCAPES
from tests.test_stream import joined, wait_gone

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Reaches os despite the allowlist, to kill the worker from inside.
SELF_KILL = ESCAPES["subclass_walk"] + "_mod('os')._exit(3)"


async def test_state_stays_in_one_worker_and_outputs_are_what_each_run_bound(shared_sandbox):
    async with shared_sandbox.session() as s:
        assert isinstance(s, Session)
        first = await s.run("import math\nx = 21\nitems = [1]")
        assert first.outputs == {"x": 21, "items": [1]} and first.skipped == {"math": "module"}
        second = await s.run("y = x * 2\nitems.append(2)")
        assert second.outputs == {"y": 42}  # items was changed in place, not rebound
        third = await s.run("x = x + offset\nroot = math.sqrt(y + 2)", {"offset": 1})
        assert third.outputs == {"x": 22, "root": pytest.approx(6.633, abs=1e-3)}
        stream = s.stream("print(y, items, offset)")
        outputs = [out async for out in stream]
        assert joined(outputs, "stdout") == "42 [1, 2] 1\n" == stream.result.stdout
        pids = {r.stats.worker_pid for r in (first, second, third, stream.result)}
        assert len(pids) == 1


async def test_a_code_error_leaves_the_session_going(shared_sandbox):
    async with shared_sandbox.session() as s:
        await s.run("n = 1")
        with pytest.raises(CodeError, match="ZeroDivisionError"):
            await s.run("n = 2\n1 / 0")
        assert (await s.run("m = n")).outputs == {"m": 2}


async def test_runs_go_one_at_a_time_in_submission_order(shared_sandbox):
    async with shared_sandbox.session() as s:
        await s.run("import time\nlog = []")
        code = "start = time.monotonic()\ntime.sleep(0.05)\nlog = log + [(i, start, time.monotonic())]"
        results = await asyncio.gather(*(s.run(code, {"i": i}) for i in range(6)))
        log = results[-1].outputs["log"]
        assert [entry[0] for entry in log] == list(range(6))
        for (_, _, end), (_, start, _) in itertools.pairwise(log):
            assert start >= end, "runs of one session overlapped"


async def test_sessions_of_one_tenant_never_see_each_others_state_or_workers():
    async with Sandbox(quick_policy(), workers=3) as sb:
        await check_isolation(sb)


async def check_isolation(shared_sandbox: Sandbox) -> None:
    async with shared_sandbox.session() as one, shared_sandbox.session() as two:
        a = await one.run("secret = 'one'")
        with pytest.raises(CodeError, match="NameError"):
            await two.run("leak = secret")
        b = await two.run("secret = 'two'")
        assert (await one.run("check = secret")).outputs == {"check": "one"}
        assert a.stats.worker_pid != b.stats.worker_pid
        plain = await asyncio.gather(*(shared_sandbox.run("z = 1") for _ in range(10)))
        assert {r.stats.worker_pid for r in plain}.isdisjoint({a.stats.worker_pid, b.stats.worker_pid})
    # Ended sessions' workers are retired, never reused.
    assert await wait_gone(a.stats.worker_pid) and await wait_gone(b.stats.worker_pid)
    later = await asyncio.gather(*(shared_sandbox.run("z = 1") for _ in range(4)))
    assert {r.stats.worker_pid for r in later}.isdisjoint({a.stats.worker_pid, b.stats.worker_pid})


async def test_a_new_session_starts_from_nothing(shared_sandbox):
    async with shared_sandbox.session() as s:
        await s.run("kept = 1")
    async with shared_sandbox.session() as s:
        with pytest.raises(CodeError, match="NameError"):
            await s.run("kept")


async def test_files_in_the_scratch_space_stay_for_the_session(shared_sandbox):
    async with shared_sandbox.session() as s:
        await s.run("handle = open('notes.txt', 'w')\nhandle.write('one ')")
        await s.run("handle.write('two')\nhandle.close()")
        assert (await s.run("text = open('notes.txt').read()")).outputs["text"] == "one two"
    # Plain runs still start from an empty scratch space.
    with pytest.raises(CodeError, match="FileNotFoundError"):
        await shared_sandbox.run("open('notes.txt')")


async def test_a_run_that_hits_its_wall_limit_ends_the_session(shared_sandbox):
    async with shared_sandbox.session() as s:
        await s.run("x = 1")
        with pytest.raises(TimeLimitExceeded):
            await s.run("print('spinning')\nwhile True:\n    pass", timeout=0.3)
        for _ in range(2):
            with pytest.raises(SessionLost) as info:
                await s.run("x")
            assert info.value.run == 2
            assert "run 2" in str(info.value) and "TimeLimitExceeded" in str(info.value)
    assert (await shared_sandbox.run("after = 1")).outputs == {"after": 1}


async def test_a_worker_that_dies_ends_the_session_with_its_reason(shared_sandbox):
    async with shared_sandbox.session() as s:
        with pytest.raises(WorkerCrashed):
            await s.run(SELF_KILL)
        with pytest.raises(SessionLost, match="run 1 ended the session: WorkerCrashed"):
            await s.stream("x = 1").__aiter__().__anext__()


async def test_runs_waiting_behind_a_fatal_run_raise_session_lost(shared_sandbox):
    async with shared_sandbox.session() as s:
        fatal = asyncio.ensure_future(s.run("while True:\n    pass", timeout=0.3))
        waiting = [asyncio.ensure_future(s.run("y = 1")) for _ in range(3)]
        with pytest.raises(TimeLimitExceeded):
            await fatal
        for task in waiting:
            with pytest.raises(SessionLost, match="run 1"):
                await task


async def test_leaving_a_session_stream_early_kills_the_worker_and_ends_the_session():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        async with sb.session() as s:
            pid = (await s.run("import time\nx = 1")).stats.worker_pid
            async for _ in s.stream("print('go')\ntime.sleep(60)"):
                break
            assert await wait_gone(pid)
            with pytest.raises(SessionLost, match="run 2 was cancelled"):
                await s.run("x")
        assert (await sb.run("y = 1")).outputs == {"y": 1}


async def test_cancelling_a_session_run_ends_the_session():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb, sb.session() as s:
        task = asyncio.ensure_future(s.run("import time\ntime.sleep(60)"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(SessionLost, match="cancelled"):
            await s.run("x = 1")


async def test_an_idle_session_is_ended_and_its_worker_freed():
    async with Sandbox(quick_policy(session_idle_s=0.5), workers=1) as sb:
        async with sb.session() as s:
            pid = (await s.run("x = 1")).stats.worker_pid
            await asyncio.sleep(0.3)
            assert (await s.run("x = 2")).outputs == {"x": 2}, "a run resets the idle clock"
            await asyncio.sleep(1.5)
            assert await wait_gone(pid)
            with pytest.raises(SessionLost, match="session_idle_s") as info:
                await s.run("x")
            assert info.value.run is None
        # Its slot went back to the pool: the one worker there is serves plain runs.
        assert (await sb.run("y = 1")).outputs == {"y": 1}


async def test_a_run_in_flight_never_counts_as_idle():
    async with Sandbox(quick_policy(session_idle_s=0.3), workers=1) as sb, sb.session() as s:
        r = await s.run("import time\ntime.sleep(1)\ndone = True")
        assert r.outputs == {"done": True}


async def test_a_session_ends_at_its_lifetime_even_in_the_middle_of_a_run():
    async with Sandbox(quick_policy(session_max_s=1.0, wall_time_s=10), workers=1) as sb:
        async with sb.session() as s:
            await s.run("x = 1")
            start = time.monotonic()
            with pytest.raises(SessionLost, match="session_max_s") as info:
                await s.run("import time\nprint('working')\ntime.sleep(30)")
            assert time.monotonic() - start < 5
            assert info.value.stdout == "working\n"
            with pytest.raises(SessionLost, match="session_max_s"):
                await s.run("x")
        assert (await sb.run("y = 1")).outputs == {"y": 1}


async def test_max_sessions_is_per_tenant():
    tenants = {"default": quick_policy(max_sessions=1), "other": quick_policy(max_sessions=1)}
    async with Sandbox(tenants=tenants, workers=3) as sb, sb.session() as first:
        with pytest.raises(QuotaExceeded) as info:
            async with sb.session():
                pass
        assert info.value.quota == "max_sessions" and "max_sessions" in str(info.value)
        async with sb.session(tenant="other") as other:
            assert (await other.run("x = 1")).outputs == {"x": 1}
        await first.run("still = True")
    async with Sandbox(quick_policy(max_sessions=0), workers=1) as sb:
        with pytest.raises(QuotaExceeded, match="max_sessions"):
            await sb.session().open()


async def test_a_session_counts_against_max_concurrency():
    async with Sandbox(quick_policy(max_concurrency=1), workers=2) as sb:
        async with sb.session() as s:
            await s.run("x = 1")
            waiting = asyncio.ensure_future(sb.run("y = 1"))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "a plain run started beside the session, over max_concurrency"
        assert (await asyncio.wait_for(waiting, 5)).outputs == {"y": 1}
        running = asyncio.ensure_future(sb.run("import time\ntime.sleep(1)"))
        await asyncio.sleep(0.3)
        with pytest.raises(QuotaExceeded) as info:
            await sb.session().open()
        assert info.value.quota == "max_concurrency"
        await running


async def test_a_session_counts_against_the_pool():
    async with Sandbox(quick_policy(), workers=1) as sb:
        async with sb.session() as s:
            await s.run("x = 1")
            with pytest.raises(QuotaExceeded) as info:
                await sb.session().open()
            assert info.value.quota == "workers"
            waiting = asyncio.ensure_future(sb.run("y = 1"))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "a plain run got a worker while the session held the only one"
        assert (await asyncio.wait_for(waiting, 5)).outputs == {"y": 1}


async def test_session_runs_count_against_the_rate_and_max_queued():
    async with Sandbox(quick_policy(rate_per_s=0.001, burst=2), workers=1) as sb, sb.session() as s:
        await s.run("x = 1")
        await s.run("x = 2")
        with pytest.raises(QuotaExceeded) as info:
            await s.run("x = 3")
        assert info.value.quota == "rate"
        assert s.ended is None, "a refused run leaves the session going"
    async with Sandbox(quick_policy(max_queued=1), workers=1) as sb, sb.session() as s:
        running = asyncio.ensure_future(s.run("import time\ntime.sleep(0.5)"))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(s.run("y = 1"))
        await asyncio.sleep(0.1)
        with pytest.raises(QuotaExceeded) as info:
            await s.run("z = 1")
        assert info.value.quota == "max_queued"
        await running
        assert (await waiting).outputs == {"y": 1}


async def test_sessions_work_for_a_fresh_process_tenant():
    async with Sandbox(quick_policy(fresh_process_per_run=True), workers=2) as sb:
        plain = [await sb.run("z = 1") for _ in range(2)]
        assert plain[0].stats.worker_pid != plain[1].stats.worker_pid
        async with sb.session() as s:
            runs = [await s.run("n = n + 1" if i else "n = 0") for i in range(4)]
        assert runs[-1].outputs == {"n": 3}
        assert len({r.stats.worker_pid for r in runs}) == 1


async def test_closing_the_sandbox_ends_every_session():
    sb = Sandbox(quick_policy(wall_time_s=30), workers=2)
    await sb.start()
    idle = await sb.session().__aenter__()
    busy = await sb.session().__aenter__()
    await idle.run("x = 1")
    in_flight = asyncio.ensure_future(busy.run("import time\nprint('working')\ntime.sleep(60)"))
    await asyncio.sleep(0.5)
    await sb.close()
    with pytest.raises(SandboxClosed) as info:
        await in_flight
    assert info.value.stdout == "working\n"
    for session in (idle, busy):
        with pytest.raises(SandboxClosed):
            await session.run("x")
        await session.close()  # leaving its block after the Sandbox closed is fine
    with pytest.raises(SandboxClosed):
        await sb.session().open()


async def test_a_closed_session_refuses_runs_and_cannot_reopen(shared_sandbox):
    s = shared_sandbox.session()
    with pytest.raises(SandboxError, match="not open"):
        await s.run("x = 1")
    async with s:
        await s.run("x = 1")
    with pytest.raises(SessionLost, match="closed"):
        await s.run("x")
    with pytest.raises(SandboxError, match="only once"):
        await s.open()


@pytest.mark.skipif(not IS_ROOT, reason="dropping to uid 65534 needs root; unprivileged, every test here is that path")
async def test_streams_and_sessions_work_for_an_unprivileged_supervisor():
    script = textwrap.dedent("""
        import json
        from sandbox.unprivileged import call_as_user, interpreter_paths

        def attempt():
            import uvloop
            from sandbox import Policy, Sandbox, SessionLost, TimeLimitExceeded

            async def main():
                async with Sandbox(Policy(wall_time_s=5), workers=2) as sb:
                    stream = sb.stream("import time\\nprint('a')\\ntime.sleep(0.5)\\nprint('b')")
                    pieces = [out.text async for out in stream]
                    async with sb.session() as s:
                        await s.run("x = 20\\nopen('f', 'w').write('kept')")
                        kept = (await s.run("y = x + 1\\nz = open('f').read()")).outputs
                        try:
                            await s.run("while True: pass", timeout=0.3)
                        except TimeLimitExceeded:
                            pass
                        try:
                            await s.run("x")
                            lost = None
                        except SessionLost as exc:
                            lost = str(exc)
                    return {"pieces": pieces, "stdout": stream.result.stdout, "kept": kept, "lost": lost,
                            "layers": sb.host.layers}
            return uvloop.run(main())

        print(json.dumps(call_as_user(attempt, 65534, interpreter_paths())))
    """)
    command = [sys.executable, "-c", script]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, cwd=REPO, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in report, report
    assert report["pieces"] == ["a\n", "b\n"] and report["stdout"] == "a\nb\n"
    assert report["kept"] == {"y": 21, "z": "kept"}
    assert "run 3 ended the session: TimeLimitExceeded" in report["lost"]
    assert report["layers"]["cgroup"].startswith("off") and report["layers"]["seccomp"] == "on"
