"""ClusterSandbox on a real two-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine.

Runs inside a network namespace of its own (see conftest.py). The tests that
damage the cluster (an agent killed, a node removed, a node added) come last
and in this order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

import psutil
import pytest
import pytest_asyncio

import sandbox
from sandbox import CodeError, ConfinementUnavailable, NodeLost, Policy, QuotaExceeded, Sandbox, TimeLimitExceeded
from sandbox.cluster import ClusterSandbox
from sandbox.cluster.offline import node_args

pytestmark = pytest.mark.asyncio(loop_scope="module")
SessionLost = getattr(sandbox, "SessionLost", None)

SLEEP = "import time\nstarted = time.time()\ntime.sleep(seconds)\nended = time.time()\n"
QUICK = Policy(wall_time_s=10.0, cpu_time_s=5.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb(ray_cluster):
    tenants = {
        "default": QUICK,
        "single": Policy(wall_time_s=10.0, cpu_time_s=5.0, max_concurrency=1, max_queued=2),
        "rated": Policy(wall_time_s=10.0, cpu_time_s=5.0, rate_per_s=0.1, burst=2),
        "other": QUICK,
        # No node can confine it: network is allowed, yet netns is required.
        "impossible": Policy(network=True, required_layers=["netns"]),
    }
    async with ClusterSandbox(tenants=tenants, workers_per_node=2) as cluster_sandbox:
        yield cluster_sandbox


def node_ids(sb: ClusterSandbox) -> set[str]:
    return {node.node_id for node in sb.nodes if node.up}


async def eventually(predicate, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.1)


async def test_every_node_has_an_agent_and_the_outputs_come_back(sb: ClusterSandbox) -> None:
    import ray

    alive = {entry["NodeID"] for entry in ray.nodes() if entry["Alive"]}
    assert node_ids(sb) == alive and len(alive) == 2
    result = await sb.run("y = [x * 2, str(x)]\nprint('hi')", {"x": 21})
    assert result.outputs == {"y": [42, "21"]}
    assert result.stdout == "hi\n"
    assert result.stats.node in alive and result.stats.tenant == "default"


async def test_runs_land_on_both_nodes(sb: ClusterSandbox) -> None:
    # Four slots in all (two per node): a burst of six fills the tenant's home and spills over.
    results = await asyncio.gather(*[sb.run(SLEEP, {"seconds": 0.5}) for _ in range(6)])
    assert {r.stats.node for r in results} == node_ids(sb)
    assert all(r.outputs["ended"] - r.outputs["started"] >= 0.5 for r in results)


async def test_errors_keep_their_type_and_details(sb: ClusterSandbox) -> None:
    with pytest.raises(CodeError) as code_error:
        await sb.run("print('before')\nraise KeyError('k')")
    assert code_error.value.type_name == "KeyError" and code_error.value.stdout == "before\n"
    assert "line 2" in code_error.value.traceback
    with pytest.raises(TimeLimitExceeded) as timeout:
        await sb.run("while True: pass", timeout=0.5)
    assert timeout.value.kind == "wall" and timeout.value.limit_s == 0.5


async def test_a_tenants_concurrency_cap_holds_across_nodes(sb: ClusterSandbox) -> None:
    runs = [asyncio.ensure_future(sb.run(SLEEP, {"seconds": 0.3}, tenant="single")) for _ in range(3)]
    await asyncio.sleep(0)  # all three admitted: one sent to a node, two queued in the client
    with pytest.raises(QuotaExceeded) as refused:
        await sb.run(SLEEP, {"seconds": 0.3}, tenant="single")  # one running and two queued already
    assert refused.value.quota == "max_queued"
    results = await asyncio.gather(*runs)
    spans = sorted((r.outputs["started"], r.outputs["ended"]) for r in results)
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans)), spans


async def test_a_tenants_rate_limit_holds_across_nodes(sb: ClusterSandbox) -> None:
    first, second = await asyncio.gather(sb.run("x = 1", tenant="rated"), sb.run("x = 2", tenant="rated"))
    with pytest.raises(QuotaExceeded) as refused:
        await sb.run("x = 3", tenant="rated")
    assert refused.value.quota == "rate"
    assert {first.stats.tenant, second.stats.tenant} == {"rated"}


async def test_the_fair_share_holds_across_nodes(sb: ClusterSandbox) -> None:
    # A flood of one tenant fills every slot of both nodes; another tenant's run waits
    # for about one run of the flood, not for all of it.
    flood = [asyncio.ensure_future(sb.run(SLEEP, {"seconds": 0.4})) for _ in range(16)]
    await asyncio.sleep(0.1)
    single = await sb.run(SLEEP, {"seconds": 0.0}, tenant="other")
    flooded = await asyncio.gather(*flood)
    still_running = [r for r in flooded if r.outputs["ended"] > single.outputs["ended"]]
    assert len(still_running) >= 8, "the other tenant's run waited behind most of the flood"


async def test_a_workflow_runs_through_the_cluster(sb: ClusterSandbox) -> None:
    from sandbox import WorkflowBuilder

    wf = WorkflowBuilder()
    wf.add_node("PythonCodeNode", "a", {"code": "value = n + 1"})
    wf.add_node("PythonCodeNode", "b", {"code": "value = n * 10"})
    wf.add_connection("a", "value", "b", "n")
    results = await sb.run_workflow(wf.build(), parameters={"a": {"n": 1}})
    assert results["b"]["value"] == 20


async def test_a_tenant_no_node_can_confine_is_refused_naming_each_node(sb: ClusterSandbox) -> None:
    for node in sb.nodes:
        assert "netns" in node.refused["impossible"]
    with pytest.raises(ConfinementUnavailable) as refused:
        await sb.run("x = 1", tenant="impossible")
    for node in sb.nodes:
        assert node.node_id in str(refused.value)


needs_live = pytest.mark.skipif(
    not hasattr(Sandbox, "stream"), reason="needs Sandbox.stream and Sandbox.session (issue 12) in this tree"
)
STREAMED = "import time\nprint('first', flush=True)\ntime.sleep(0.3)\nprint('second')\nvalue = 7\n"


async def test_a_cancelled_run_is_stopped_on_its_node(sb: ClusterSandbox) -> None:
    spinning = [asyncio.ensure_future(sb.run("while True: pass")) for _ in range(4)]  # every slot of both nodes
    await eventually(lambda: sum(node.in_flight for node in sb.nodes) == 4, 10, "four runs in flight")
    await asyncio.sleep(0.5)
    for run in spinning:
        run.cancel()
    await asyncio.gather(*spinning, return_exceptions=True)
    assert sum(node.in_flight for node in sb.nodes) == 0
    # Had a spinning worker been left running, one of these would wait for its 10 s wall-clock limit.
    started = time.monotonic()
    results = await asyncio.gather(*[sb.run(SLEEP, {"seconds": 0.2}) for _ in range(4)])
    assert len(results) == 4 and time.monotonic() - started < 6


@needs_live
async def test_a_stream_delivers_output_as_written_through_the_cluster(sb: ClusterSandbox) -> None:
    stream = sb.stream(STREAMED)
    pieces = [piece async for piece in stream]
    assert "".join(piece.text for piece in pieces) == "first\nsecond\n"
    assert pieces[0].text == "first\n" and pieces[0].stream == "stdout"  # before the run ended
    assert pieces[-1].at >= pieces[0].at + 0.25
    assert stream.result.outputs == {"value": 7} and stream.result.stdout == "first\nsecond\n"
    assert stream.result.stats.node in node_ids(sb)
    failing = sb.stream("print('partial')\nraise ValueError('late')")
    seen = []
    with pytest.raises(CodeError):
        async for piece in failing:
            seen.append(piece.text)
    assert "".join(seen) == "partial\n"


@needs_live
async def test_a_session_keeps_its_state_on_one_node(sb: ClusterSandbox) -> None:
    async with sb.session() as session:
        first = await session.run("counter = 1")
        second = await session.run("counter += step", {"step": 2})
        streamed = session.stream("print(counter)")
        pieces = [piece.text async for piece in streamed]
    assert second.outputs == {"counter": 3} and pieces == ["3\n"]
    assert first.stats.node == second.stats.node == streamed.result.stats.node
    assert first.stats.worker_pid == second.stats.worker_pid
    with pytest.raises(SessionLost):
        await session.run("counter")


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


async def test_killing_an_agent_leaves_no_worker_or_zygote_behind(sb: ClusterSandbox) -> None:
    node = sb.nodes[0]
    tree = process_tree(node.supervisor_pid)
    assert len(tree) >= 3, tree  # the supervisor, its zygote and workers
    old_supervisor = node.supervisor_pid
    os.kill(node.agent_pid, signal.SIGKILL)
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    # Ray restarts the agent, which starts a new supervisor; the node is used again.
    await eventually(lambda: node.up and node.supervisor_pid != old_supervisor, 30, "the agent came back")
    results = await asyncio.gather(*[sb.run(SLEEP, {"seconds": 0.5}) for _ in range(6)])
    assert node.node_id in {r.stats.node for r in results}


async def test_a_dead_supervisor_fails_its_runs_in_flight_and_is_replaced(sb: ClusterSandbox) -> None:
    await eventually(lambda: all(node.up for node in sb.nodes), 30, "both nodes up")
    node = sb.nodes[-1]
    old_supervisor = node.supervisor_pid
    tree = process_tree(old_supervisor)
    runs = [asyncio.ensure_future(sb.run(SLEEP, {"seconds": 2.0})) for _ in range(4)]  # every slot of both nodes
    await eventually(lambda: node.in_flight == 2, 10, "two runs in flight on the node")
    await asyncio.sleep(0.3)
    os.kill(old_supervisor, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), timeout=60)
    lost = [o for o in outcomes if isinstance(o, NodeLost)]
    assert len(lost) == 2 and all(o.node == node.node_id for o in lost), outcomes
    assert all(r.stats.node != node.node_id for r in outcomes if not isinstance(r, BaseException))
    _gone, alive = psutil.wait_procs(tree, timeout=30)  # its zygote and workers died with it
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    await eventually(lambda: node.up and node.supervisor_pid != old_supervisor, 30, "a new supervisor")
    results = await asyncio.gather(*[sb.run(SLEEP, {"seconds": 0.5}) for _ in range(6)])
    assert node.node_id in {r.stats.node for r in results}


async def test_a_node_removed_under_load(sb: ClusterSandbox, ray_cluster) -> None:
    await eventually(lambda: all(node.up for node in sb.nodes), 30, "both nodes up")
    head_id = ray_cluster.head_node.node_id
    lost_node = next(node for node in sb.nodes if node.node_id != head_id)
    lost_tree = process_tree(lost_node.supervisor_pid)
    before = sb.dispatched
    runs = [asyncio.ensure_future(sb.run(SLEEP, {"seconds": 3.0})) for _ in range(8)]
    await eventually(lambda: lost_node.in_flight == 2, 10, "runs in flight on the node to remove")
    ray_cluster.remove_node(next(n for n in ray_cluster.worker_nodes))
    outcomes = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), timeout=60)
    lost = [o for o in outcomes if isinstance(o, NodeLost)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(lost) + len(done) == len(runs), outcomes
    assert len(lost) == 2 and all(o.node == lost_node.node_id for o in lost)
    assert all(r.stats.node == head_id for r in done)
    assert sb.dispatched - before == len(runs)  # none was sent twice
    later = await sb.run("x = 2")
    assert later.outputs == {"x": 2} and later.stats.node == head_id
    _gone, alive = psutil.wait_procs(lost_tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


async def test_a_node_added_later_receives_runs(sb: ClusterSandbox, ray_cluster) -> None:
    known = node_ids(sb)
    ray_cluster.add_node(**node_args("c"))
    await eventually(lambda: len(node_ids(sb)) == len(known) + 1, 60, "the new node was found")
    (new_node,) = node_ids(sb) - known
    results = await asyncio.gather(*[sb.run(SLEEP, {"seconds": 0.5}) for _ in range(4)])
    assert new_node in {r.stats.node for r in results}


@needs_live
async def test_a_session_on_a_lost_node_ends_and_the_others_go_on(sb: ClusterSandbox, ray_cluster) -> None:
    head_id = ray_cluster.head_node.node_id
    await eventually(lambda: len(node_ids(sb)) == 2, 30, "two nodes up")
    # Two slots per node: three sessions fill one node and put at least one on the other.
    sessions = [sb.session() for _ in range(3)]
    for session in sessions:
        await session.open()
    try:
        (doomed,) = [s for s in sessions if s.node.node_id != head_id][:1]
        survivors = [s for s in sessions if s.node.node_id == head_id]
        in_flight = asyncio.ensure_future(doomed.run("import time\ntime.sleep(5)"))
        await asyncio.sleep(0.5)
        ray_cluster.remove_node(next(n for n in ray_cluster.worker_nodes if n.node_id == doomed.node.node_id))
        with pytest.raises(NodeLost):
            await asyncio.wait_for(in_flight, timeout=30)
        with pytest.raises(SessionLost):
            await doomed.run("x = 1")
        for session in survivors:
            assert (await session.run("x = 1")).stats.node == head_id
    finally:
        for session in sessions:
            await session.close()
