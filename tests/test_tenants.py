"""Tenants: no shared workers, no shared state, worker reuse rules, quotas and fair share."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from sandbox import QuotaExceeded, Sandbox, SandboxError, TenantStats, TimeLimitExceeded
from tests.conftest import HOSTILE, quick_policy
from tests.hostile.attacks import ESCAPES

ESCAPE = ESCAPES["subclass_walk"]


async def test_tenants_never_share_a_worker_process():
    tenants = {"a": quick_policy(), "b": quick_policy()}
    async with Sandbox(tenants=tenants, workers=2) as sb:
        runs = [sb.run("import time\ntime.sleep(0.01)\nx = 1", tenant=t) for t in ("a", "b") * 15]
        results = await asyncio.gather(*runs)
    pids = {t: {r.stats.worker_pid for r in results if r.stats.tenant == t} for t in ("a", "b")}
    assert pids["a"] and pids["b"] and not pids["a"] & pids["b"]


@pytest.mark.parametrize(
    "poison",
    [
        "import json\njson.dumps = lambda *a, **k: 'poisoned'",
        "__builtins__['len'] = lambda x: -1",
        ESCAPE + "_mod('builtins').len = lambda x: -1\n_mod('json').dumps = lambda *a, **k: 'poisoned'",
        ESCAPE + "sys = _mod('sys')\nsys.modules['json'] = type(sys)('json')",
    ],
)
async def test_nothing_one_tenant_does_is_visible_to_another(poison):
    async with Sandbox(tenants={"a": quick_policy(), "b": quick_policy()}, workers=2) as sb:
        # Poisoning the real builtins may break tenant a's own worker; that is its business.
        await asyncio.gather(*(sb.run(poison, tenant="a") for _ in range(3)), return_exceptions=True)
        r = await sb.run("import json\nout = json.dumps({'a': 1})\nn = len([1, 2])", tenant="b")
        assert r.outputs == {"out": '{"a": 1}', "n": 2}


async def test_poison_shared_module_sample_holds():
    sample = HOSTILE / "poison_shared_module.py"
    if not sample.exists():
        pytest.skip("../shared/hostile is not present")
    async with Sandbox(tenants={"a": quick_policy(), "b": quick_policy()}, workers=1) as sb:
        assert (await sb.run(sample.read_text(), tenant="a")).outputs == {"done": True}
        r = await sb.run("import json\nout = json.dumps({'a': 1})", tenant="b")
        assert r.outputs == {"out": '{"a": 1}'}


async def test_workers_are_reused_within_a_tenant_unless_fresh_process_per_run():
    tenants = {
        "reuse": quick_policy(),
        "fresh": quick_policy(fresh_process_per_run=True),
        "short": quick_policy(max_runs_per_worker=2),
    }
    async with Sandbox(tenants=tenants, workers=2) as sb:

        async def pids(tenant, n=4):
            return [(await sb.run("x = 1", tenant=tenant)).stats.worker_pid for _ in range(n)]

        assert len(set(await pids("reuse"))) == 1
        assert len(set(await pids("fresh"))) == 4
        short = await pids("short")
        assert short[0] == short[1] != short[2] == short[3]


async def test_runs_in_flight_are_bounded_by_workers_while_every_tenant_stays_warm():
    tenants = {name: quick_policy() for name in ("a", "b", "c")}
    async with Sandbox(tenants=tenants, workers=2) as sb:
        code = "import time\nstart = time.monotonic()\ntime.sleep(0.02)\nend = time.monotonic()"
        results = await asyncio.gather(*(sb.run(code, tenant=t) for t in ("a", "b", "c") * 8))
        warm = {t: sb._pool.idle_count(t) for t in ("a", "b", "c")}
    assert len(results) == 24 and {r.stats.tenant for r in results} == {"a", "b", "c"}
    events = sorted([(r.outputs["start"], 1) for r in results] + [(r.outputs["end"], -1) for r in results])
    in_flight = list(itertools.accumulate(change for _, change in events))
    assert max(in_flight) <= 2, in_flight
    assert all(count >= 1 for count in warm.values()), warm


async def test_busy_tenants_keep_their_workers_instead_of_trading_them():
    """Two tenants, both always busy, on two workers: each keeps the workers
    it started, not an eviction and a new worker at every run."""
    async with Sandbox(tenants={"a": quick_policy(), "b": quick_policy()}, workers=2) as sb:
        runs = [sb.run("x = 1", tenant=t) for _ in range(60) for t in ("a", "b")]
        results = await asyncio.gather(*runs)
    pids = {tenant: {r.stats.worker_pid for r in results if r.stats.tenant == tenant} for tenant in ("a", "b")}
    # Each tenant starts at most one worker per running slot.
    assert len(pids["a"]) <= 2 and len(pids["b"]) <= 2, pids


async def test_a_tenant_keeps_its_warm_worker_while_others_run():
    async with Sandbox(tenants={"a": quick_policy(), "b": quick_policy()}, workers=1) as sb:
        first = (await sb.run("x = 1", tenant="a")).stats.worker_pid
        await asyncio.gather(*(sb.run("x = 1", tenant="b") for _ in range(5)))
        await asyncio.gather(*(sb.run("x = 1") for _ in range(5)))
        assert (await sb.run("x = 1", tenant="a")).stats.worker_pid == first


async def test_the_least_recently_used_warm_worker_is_retired_when_the_budget_is_full():
    tenants = {name: quick_policy() for name in ("a", "b", "c")}
    async with Sandbox(tenants=tenants, workers=1, max_idle_workers=2) as sb:
        pids = {t: (await sb.run("x = 1", tenant=t)).stats.worker_pid for t in ("a", "b", "c")}
        assert len(sb._pool.workers) <= 2
        assert (await sb.run("x = 1", tenant="c")).stats.worker_pid == pids["c"]
        assert (await sb.run("x = 1", tenant="b")).stats.worker_pid == pids["b"]
        assert (await sb.run("x = 1", tenant="a")).stats.worker_pid != pids["a"]  # it was the oldest


async def test_no_worker_is_kept_warm_without_an_idle_memory_budget():
    async with Sandbox(quick_policy(), workers=1, idle_memory_mb=0) as sb:
        pids = [(await sb.run("x = 1")).stats.worker_pid for _ in range(3)]
        assert len(set(pids)) == 3
        assert len(sb._pool.workers) == 0


async def test_a_worker_that_holds_more_memory_than_the_warm_budget_is_retired_after_its_run():
    """Each worker is charged the memory of its own (its memory cgroup's charge where it
    has one, else its private pages): a tenant that keeps 60 MB does not fit a 40 MB
    budget and loses its worker, while a trivial tenant's stays warm under the same budget."""
    keep = "import json\njson._kept = bytearray(60_000_000)\nx = 1"
    tenants = {"big": quick_policy(memory_mb=256), "small": quick_policy()}
    async with Sandbox(tenants=tenants, workers=1, idle_memory_mb=40) as sb:
        small = [(await sb.run("x = 1", tenant="small")).stats.worker_pid for _ in range(2)]
        first_big = (await sb.run(keep, tenant="big")).stats.worker_pid
        deadline = time.monotonic() + 5  # without a cgroup of its own, the charge is read in a thread
        while sb._pool.has_idle("big") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not sb._pool.has_idle("big"), "a 60 MB worker was kept warm within a 40 MB budget"
        assert small[0] == small[1]
        assert (await sb.run(keep, tenant="big")).stats.worker_pid != first_big


async def test_a_new_tenant_gets_a_worker_without_retiring_a_warm_one():
    """The pool starts its workers for the default tenant; another tenant's
    first run starts a worker of its own while there is room for it."""
    async with Sandbox(tenants={"a": quick_policy()}, workers=2) as sb:
        result = await asyncio.wait_for(sb.run("x = 1", tenant="a"), timeout=10)
        assert result.outputs == {"x": 1}
        assert sb._pool.idle_count("a") == 1 and sb._pool.idle_count("default") == 2


async def test_a_long_run_gets_its_tenant_a_spare_for_after_a_kill():
    async with Sandbox(quick_policy(), workers=1) as sb:
        killed = (await sb.run("x = 1")).stats.worker_pid
        with pytest.raises(TimeLimitExceeded):
            await sb.run("while True:\n    pass", timeout=0.5)
        assert sb._pool.has_idle("default")  # started while the run spun, ready now
        assert (await sb.run("x = 1")).stats.worker_pid != killed


@pytest.mark.parametrize("knobs", [{"max_idle_workers": -1}, {"idle_memory_mb": -5}])
def test_warm_budget_knobs_are_checked(knobs):
    with pytest.raises(SandboxError, match="must be 0 or more"):
        Sandbox(**knobs)


async def test_idle_workers_are_retired():
    async with Sandbox(quick_policy(), workers=2, idle_timeout_s=0.2) as sb:
        assert len(sb._pool.workers) == 2
        await asyncio.sleep(0.6)
        assert len(sb._pool.workers) == 0
        assert (await sb.run("x = 1")).outputs == {"x": 1}


async def test_stats_hold_the_tenants_with_load_and_answer_for_the_others():
    tenants = {"busy": quick_policy(), "quiet": quick_policy()}
    async with Sandbox(tenants=tenants, workers=2, max_idle_workers=0) as sb:
        run = asyncio.ensure_future(sb.run("import time\ntime.sleep(0.5)", tenant="busy"))
        while sb.stats().tenant("busy").running == 0:
            await asyncio.sleep(0.01)
        stats = sb.stats()
        assert stats.tenants["busy"] == TenantStats(queued=0, running=1, workers=1)
        assert "quiet" not in stats.tenants
        assert stats.tenant("quiet") == TenantStats(queued=0, running=0, workers=0)
        assert stats.workers["busy"] == 1
        await run
        assert "busy" not in sb.stats().tenants  # no worker is kept warm: nothing is left of its load


async def test_max_concurrency_caps_runs_in_flight():
    tenants = {"one": quick_policy(max_concurrency=1)}
    async with Sandbox(tenants=tenants, workers=2) as sb:
        code = "import time\nstart = time.monotonic()\ntime.sleep(0.05)\nend = time.monotonic()"
        results = await asyncio.gather(*(sb.run(code, tenant="one") for _ in range(4)))
    spans = sorted((r.outputs["start"], r.outputs["end"]) for r in results)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))


async def test_rate_limit_is_a_token_bucket_answered_at_once():
    tenants = {"limited": quick_policy(rate_per_s=2, burst=3)}
    async with Sandbox(tenants=tenants, workers=1) as sb:
        accepted = [asyncio.ensure_future(sb.run("x = 1", tenant="limited")) for _ in range(3)]
        await asyncio.sleep(0)  # all three submitted, each took a token
        start = time.monotonic()
        with pytest.raises(QuotaExceeded) as info:
            await sb.run("x = 1", tenant="limited")
        assert time.monotonic() - start < 0.1
        assert info.value.quota == "rate" and info.value.tenant == "limited"
        assert len(await asyncio.gather(*accepted)) == 3
        await asyncio.sleep(0.6)  # one token back at 2/s
        assert (await sb.run("x = 2", tenant="limited")).outputs == {"x": 2}


async def test_max_queued_is_answered_at_once():
    async with Sandbox(tenants={"q": quick_policy(max_queued=2)}, workers=1) as sb:
        await sb.run("warm = 1", tenant="q")  # q now has an idle worker: one runs, two queue
        runs = [asyncio.ensure_future(sb.run("import time\ntime.sleep(0.1)", tenant="q")) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QuotaExceeded) as info:
            await sb.run("x = 1", tenant="q")
        assert info.value.quota == "max_queued"
        await asyncio.gather(*runs)


async def test_a_flooding_tenant_does_not_starve_another():
    """Tenant A queues 300 runs of 50 ms; tenant B's single run finishes well under a second."""
    async with Sandbox(tenants={"a": quick_policy(), "b": quick_policy()}, workers=2) as sb:
        flood = [asyncio.ensure_future(sb.run("import time\ntime.sleep(0.05)", tenant="a")) for _ in range(300)]
        await asyncio.sleep(0.2)
        start = time.monotonic()
        r = await sb.run("x = 1", tenant="b")
        waited = time.monotonic() - start
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    assert r.outputs == {"x": 1}
    assert waited < 0.6, f"tenant b waited {waited:.2f}s behind the flood"


async def test_weights_share_capacity_between_busy_tenants():
    tenants = {"heavy": quick_policy(weight=3), "light": quick_policy(weight=1)}
    async with Sandbox(tenants=tenants, workers=1) as sb:
        order: list[str] = []

        async def run(tenant):
            await sb.run("import time\ntime.sleep(0.01)", tenant=tenant)
            order.append(tenant)

        tasks = [asyncio.ensure_future(run(t)) for t in ("heavy", "light") for _ in range(24)]
        while len(order) < 20:
            await asyncio.sleep(0.01)
        first = order[:20]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert 12 <= first.count("heavy") <= 17, first
