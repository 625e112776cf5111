"""The scheduler's choice of the next tenant: fair-share order behind gates,
at a cost that does not grow with the tenants waiting.

The scheduler holds no processes, so these tests drive it directly with
gates of their own; ``tests/test_tenants.py`` covers the same rules
through a real Sandbox and its workers.
"""

from __future__ import annotations

import asyncio
import random

from sandbox import Policy, Sandbox
from sandbox.job import Job
from sandbox.scheduler import Scheduler, TenantQueue
from tests.conftest import quick_policy

GATES = ("slot", "start", "first start")


def make_job(tenant: str) -> Job:
    return Job(tenant, "x = 1", {}, True, "<code>", 5.0, asyncio.get_running_loop().create_future())


def fair_choice(scheduler: Scheduler, gate_of: dict[str, str | None], is_open: dict[str, bool]) -> TenantQueue | None:
    """The old rule, asked of every waiting tenant: the smallest (virtual time, oldest run) behind an open gate."""
    eligible = [
        tenant
        for tenant in scheduler.tenants.values()
        if tenant.queue
        and tenant.under_concurrency_cap
        and gate_of[tenant.name] is not None
        and is_open[gate_of[tenant.name]]
    ]
    return min(eligible, key=lambda t: (t.vtime, t.queue[0].seq), default=None)


async def test_pick_matches_asking_every_waiting_tenant_through_random_changes():
    rng = random.Random(15)
    policies = {
        f"t{i}": Policy(weight=rng.choice((1, 1, 2, 5)), max_concurrency=rng.choice((None, 1, 3))) for i in range(40)
    }
    scheduler = Scheduler(policies)
    gate_of: dict[str, str | None] = {name: rng.choice(GATES) for name in policies}
    is_open = dict.fromkeys(GATES, True)
    running: list[Job] = []
    for step in range(6000):
        action = rng.random()
        if action < 0.35:
            name = rng.choice(list(policies))
            scheduler.admit(make_job(name))
        elif action < 0.5 and running:
            scheduler.finished(running.pop(rng.randrange(len(running))))
        elif action < 0.6:
            name = rng.choice(list(policies))
            gate_of[name] = rng.choice((*GATES, None))
            scheduler.touch(name)
        elif action < 0.7:
            is_open[rng.choice(GATES)] = rng.random() < 0.6
        elif action < 0.75:
            tenant = scheduler.tenants[rng.choice(list(policies))]
            if tenant.queue:
                assert scheduler.withdraw(tenant.queue[-1])
        expected = fair_choice(scheduler, gate_of, is_open)
        chosen = scheduler.pick(lambda t: gate_of[t.name], lambda gate: is_open[gate])
        assert chosen is expected, f"step {step}: picked {chosen and chosen.name}, fair is {expected and expected.name}"
        if chosen is not None and rng.random() < 0.7:
            running.append(scheduler.started(chosen))
    assert running, "the random walk never started a run"


async def test_a_question_costs_nothing_per_waiting_tenant_that_did_not_change():
    scheduler = Scheduler({f"t{i}": Policy() for i in range(10_000)})
    for name in scheduler.tenants:
        scheduler.admit(make_job(name))
    asked: list[str] = []
    opened: list[str] = []

    def gate_of(tenant: TenantQueue) -> str:
        asked.append(tenant.name)
        return "slot"

    def is_open(gate: str) -> bool:
        opened.append(gate)
        return False  # every slot taken: the common question with no answer

    assert scheduler.pick(gate_of, is_open) is None
    assert len(asked) == 10_000  # each admitted tenant is placed once
    asked.clear()
    opened.clear()
    for _ in range(100):
        assert scheduler.pick(gate_of, is_open) is None
    assert asked == [] and opened == ["slot"] * 100
    scheduler.touch("t7")
    assert scheduler.pick(gate_of, lambda gate: True).name == "t0"  # the oldest run goes first
    assert asked == ["t7"]


async def test_the_heaps_stay_in_proportion_to_the_waiting_tenants():
    scheduler = Scheduler({"a": Policy(), "b": Policy()})
    for _ in range(5000):
        for name in ("a", "b"):
            scheduler.admit(make_job(name))
            tenant = scheduler.pick(lambda t: "slot", lambda gate: True)
            assert tenant is not None
            scheduler.finished(scheduler.started(tenant))
    assert sum(len(heap) for heap in scheduler._gates.values()) < 100
    assert len(scheduler._vtimes) < 100


async def test_many_tenants_with_runs_queued_at_once_all_finish_in_order():
    """Runs of 60 tenants queued together, some capped at one run at a time and one holding a session."""
    policies = {f"t{i}": quick_policy(max_concurrency=1 if i % 3 == 0 else None) for i in range(60)}
    async with Sandbox(tenants=policies, workers=2, max_idle_workers=20) as sb, sb.session("t1") as session:
        finished: dict[str, list[int]] = {name: [] for name in policies}

        async def run(name: str, index: int) -> None:
            result = await sb.run(f"i = {index}", tenant=name)
            finished[name].append(result.outputs["i"])

        runs = [run(name, index) for index in range(4) for name in policies]
        await asyncio.wait_for(asyncio.gather(*runs, session.run("x = 1")), 60)
    for name, order in finished.items():
        if policies[name].max_concurrency == 1:
            assert order == [0, 1, 2, 3], (name, order)
        else:
            assert sorted(order) == [0, 1, 2, 3], (name, order)
