"""``ClusterSandbox``: the ``Sandbox`` API over every node of a Ray cluster.

Owns: the cluster's membership as this client sees it (one node agent per
alive node, found when it joins, dropped when it dies), admission and
quotas for the whole cluster, routing each run to a node, and turning a
lost node into ``NodeLost`` for exactly the runs it had in flight.

Must never: run a run twice. A run sent to a node that is then lost may
have had side effects there, so it ends with ``NodeLost``; only runs that
never left this client's queue go to other nodes. Nor may it send a tenant's
run to a node that refused that tenant (fail closed per node), or let Ray
queue without bound: each node gets at most its capacity of runs at a time,
and its agent's ``max_pending_calls`` is a hard stop behind that.

Why admission lives here: the quotas (``max_concurrency``, ``max_queued``,
the rate limit) and the fair share hold for a tenant, not for a node, so
the one place that sees every run of the cluster (this client) applies
them, with the same ``Scheduler`` a local Sandbox uses. A node's own
Sandbox never has more runs than workers, so it never queues or reorders.
Several clients on one cluster each enforce their quotas separately.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sandbox.cluster import protocol, routing
from sandbox.cluster.agent import NodeAgent
from sandbox.errors import ConfinementUnavailable, InputError, NodeLost, QuotaExceeded, SandboxClosed, SandboxError
from sandbox.job import Job
from sandbox.policies.model import Policy
from sandbox.result import Result
from sandbox.scheduler import Scheduler, TenantQueue
from sandbox.supervisor import DEFAULT_TENANT, tenant_policies

if TYPE_CHECKING:
    from sandbox.cluster.session import ClusterSession
    from sandbox.workflow import Workflow

logger = logging.getLogger(__name__)
# Called with (0 for stdout or 1 for stderr, text, seconds since the run began), as Sandbox.stream's observer is.
OutputObserver = Callable[[int, str, float], None]
_STREAMS = {"stdout": 0, "stderr": 1}

_MEMBERSHIP_PERIOD_S = 1.0
_AGENT_RESTARTS = 3
_DESCRIBE_TIMEOUT_S = 5.0
_JOIN_TIMEOUT_S = 120.0  # an agent starts its supervisor, which probes the node: seconds, not minutes
_ANSWER_GRACE_S = 30.0  # past a run's wall-clock limit, after which its node is deemed lost for it
_PENDING_HEADROOM = 4  # calls an agent accepts beyond its capacity (describe, streams ending)
# Any failure of the call itself (the agent died, its node is gone, the call could not be placed):
# for a run in flight, that is the loss of its node.
_RAY_FAILURES = (ray.exceptions.RayError,)


@dataclass(eq=False)
class Node:
    """One node as the client sees it. ``refused`` maps tenants to why this node cannot confine them."""

    node_id: str
    agent: Any
    capacity: int
    host: str = ""
    layers: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    supervisor_pid: int = 0
    agent_pid: int = 0
    in_flight: int = 0
    up: bool = True


class ClusterJob(Job):
    """A run as the client queues it: the encoded request, and who hears its output as it comes."""

    __slots__ = ("answer", "output_to", "request")

    def __init__(
        self,
        tenant: str,
        request: bytes,
        wall_time_s: float,
        output_to: OutputObserver | None,
        future: asyncio.Future[Any],
    ) -> None:
        super().__init__(tenant, "", {}, True, "", wall_time_s, future)
        self.request = request
        self.output_to = output_to
        self.answer = future  # the same future as ``future``, which the base class types for a local run


class ClusterSandbox:
    """Runs code nodes on the nodes of a Ray cluster, with the ``Sandbox`` API.

    ``policy``/``tenants`` are as for ``Sandbox``; every node serves the
    tenants it can confine. ``address`` is passed to ``ray.init`` (None
    joins an initialised Ray or starts a local one). ``workers_per_node``
    bounds each node's workers (default: the node's Ray CPUs).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        tenants: Mapping[str, Policy] | None = None,
        address: str | None = None,
        workers_per_node: int | None = None,
    ) -> None:
        policies = tenant_policies(policy, tenants)
        if workers_per_node is not None and workers_per_node < 1:
            raise SandboxError("workers_per_node must be at least 1")
        self.policies = policies
        self._address = address
        self._workers_per_node = workers_per_node
        self._scheduler = Scheduler(policies)
        self._nodes: dict[str, Node] = {}
        self._joining: set[str] = set()
        self.unusable: dict[str, str] = {}  # node id -> why its agent could not start (it gets no runs)
        self._running: dict[Job, Node] = {}
        self._calls: dict[Job, asyncio.Task[None]] = {}
        self.sessions: set[ClusterSession] = set()
        self.dispatched = 0  # runs sent to a node: each run is sent at most once, ever
        self._state = "new"
        self._membership: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ClusterSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise SandboxError("a ClusterSandbox can be started only once")
        self._loop = asyncio.get_running_loop()
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=self._address)
        self._state = "open"
        await self.refresh_nodes()
        if not any(node.up for node in self._nodes.values()):
            await self.close()
            raise SandboxError(f"no node of the Ray cluster could start a node agent: {self.unusable}")
        self._membership = self._loop.create_task(self._watch_membership())

    async def close(self) -> None:
        """Fail queued runs with SandboxClosed, stop every node's agent and supervisor."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._membership is not None:
            self._membership.cancel()
        for job in self._scheduler.drain():
            job.fail(SandboxClosed("the cluster sandbox was closed before this run started"))
        for job in list(self._running):
            job.fail(SandboxClosed("the cluster sandbox was closed while this run was in flight"))
        for task in list(self._calls.values()):
            task.cancel()
        for session in list(self.sessions):
            session.lose("the cluster sandbox was closed")
        for node in self._nodes.values():
            ray.kill(node.agent, no_restart=True)
        self._nodes.clear()

    # --- membership ------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """The nodes this client uses now, with what each refused and why."""
        return list(self._nodes.values())

    async def refresh_nodes(self) -> None:
        """Start agents on nodes that joined, drop nodes that died, ask every agent how it is.

        Asking each agent (one small call per node per refresh) is how a
        restarted agent, and so a new supervisor, is noticed when no run was
        in flight to notice it.
        """
        alive = {
            entry["NodeID"]: entry
            for entry in await asyncio.to_thread(ray.nodes)
            if entry.get("Alive") or entry.get("alive")
        }
        for node_id in [n for n in self._nodes if n not in alive]:
            self.lose(self._nodes.pop(node_id), "it left the Ray cluster")
        joins = [self._join(node_id, entry) for node_id, entry in alive.items() if node_id not in self._nodes]
        checks = [self._check(node) for node in self._nodes.values()]
        await asyncio.gather(*joins, *checks)
        self._pump()

    async def _watch_membership(self) -> None:
        while True:
            await asyncio.sleep(_MEMBERSHIP_PERIOD_S)
            try:
                await self.refresh_nodes()
            except Exception:
                logger.exception("could not refresh the cluster's nodes")

    async def _join(self, node_id: str, entry: dict[str, Any]) -> None:
        if node_id in self._joining or node_id in self.unusable:
            return
        self._joining.add(node_id)
        workers = self._workers_per_node or max(1, int(entry.get("Resources", {}).get("CPU", 1)))
        tenants = {name: policy.model_dump(mode="json") for name, policy in self.policies.items()}
        agent: Any = (
            ray.remote(NodeAgent)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                num_cpus=0,
                max_restarts=_AGENT_RESTARTS,
                max_task_retries=0,
                max_pending_calls=workers + _PENDING_HEADROOM,
                max_concurrency=workers + _PENDING_HEADROOM,
            )
            .remote(tenants, workers, node_id)
        )
        try:
            report = await asyncio.wait_for(agent.describe.remote(), timeout=_JOIN_TIMEOUT_S)
        except Exception as exc:  # its creation failed (the reason is in the error), or it hangs
            self.unusable[node_id] = str(exc) or f"its agent did not start within {_JOIN_TIMEOUT_S:g} s"
            logger.warning("node %s gets no runs: its agent did not start: %s", node_id, exc)
            ray.kill(agent, no_restart=True)
            return
        finally:
            self._joining.discard(node_id)
        if self._state != "open":
            ray.kill(agent, no_restart=True)
            return
        node = Node(node_id, agent, int(report["capacity"]))
        self._update(node, report)
        self._nodes[node_id] = node
        for tenant, why in node.refused.items():
            logger.warning("node %s gets no runs of tenant %r: %s", node_id, tenant, why)

    def _update(self, node: Node, report: dict[str, Any]) -> None:
        if node.agent_pid and report["agent_pid"] != node.agent_pid:
            for session in [s for s in self.sessions if s.node is node]:
                session.lose(f"the node agent on node {node.node_id} was restarted")
        node.host = report["host"]
        node.layers = report["layers"]
        node.refused = report["refused"]
        node.supervisor_pid = report["supervisor_pid"]
        node.agent_pid = report["agent_pid"]
        node.up = True
        self._scheduler.touch_all()  # the nodes serving a tenant are its gate

    async def _check(self, node: Node) -> None:
        """Mark a node down if its agent died, up again once the agent (restarted by Ray) answers.

        An agent that is only slow to answer keeps its state: being busy is
        not being lost, and its runs in flight must not be failed for it.
        """
        try:
            report = await asyncio.wait_for(node.agent.describe.remote(), timeout=_DESCRIBE_TIMEOUT_S)
        except TimeoutError:
            return
        except _RAY_FAILURES as exc:
            self.lose(node, f"its agent failed: {type(exc).__name__}")
            return
        self._update(node, report)

    def lose(self, node: Node, why: str) -> None:
        node.up = False
        self._scheduler.touch_all()
        for job, where in list(self._running.items()):
            if where is node:
                job.fail(lost(node, why))
        for session in [s for s in self.sessions if s.node is node]:
            session.lose(f"its node {node.node_id} was lost ({why})")

    # --- sessions ----------------------------------------------------------------------

    def take_session_slot(self, tenant: str) -> Node:
        """A node slot for a new session of ``tenant``, or QuotaExceeded naming the limit.

        As on a local Sandbox, a session never waits: it holds a worker (a
        slot of its node) and a place under ``max_concurrency`` for its
        life, and ``max_sessions`` counts the whole cluster's sessions.
        """
        self.check_open(tenant)
        self._refuse_if_unservable(tenant)
        queue = self._scheduler.tenants[tenant]
        policy = queue.policy
        if queue.sessions >= policy.max_sessions:
            raise QuotaExceeded(
                f"tenant {tenant!r} already has {queue.sessions} sessions open in the cluster, its max_sessions; "
                "close one or raise the limit",
                tenant=tenant,
                quota="max_sessions",
            )
        cap = policy.max_concurrency
        if cap is not None and queue.in_flight + queue.sessions >= cap:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {queue.in_flight} runs in flight and {queue.sessions} sessions open "
                f"in the cluster, its max_concurrency of {cap}; retry later",
                tenant=tenant,
                quota="max_concurrency",
            )
        node = routing.choose(tenant, self.serving(queue))
        if node is None:
            slots = sum(node.capacity for node in self.serving(queue))
            raise QuotaExceeded(
                f"all {slots} workers of the cluster's nodes are busy or held by sessions "
                "(ClusterSandbox(workers_per_node=...)); retry later",
                tenant=tenant,
                quota="workers",
            )
        node.in_flight += 1
        queue.sessions += 1
        self._scheduler.touch(tenant)
        return node

    def give_back_session_slot(self, node: Node, tenant: str) -> None:
        node.in_flight -= 1
        self._scheduler.tenants[tenant].sessions -= 1
        self._scheduler.touch(tenant)
        self._pump()

    # --- runs ------------------------------------------------------------------------

    async def run(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
    ) -> Result:
        """As ``Sandbox.run``, on some node of the cluster; ``stats.node`` says which."""
        return await self.execute(code, inputs, tenant=tenant, timeout=timeout)

    async def execute(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
        allow_await: bool = True,
        filename: str = "<code>",
        observer: OutputObserver | None = None,
    ) -> Result:
        """``run`` with the knobs workflows and streams need (see ``Sandbox.execute``)."""
        self.check_open(tenant)
        self._refuse_if_unservable(tenant)
        op = "run" if observer is None else "stream"
        request = encode_run(op, code, inputs, timeout, tenant=tenant, allow_await=allow_await, filename=filename)
        wall = self.policies[tenant].wall_time_s if timeout is None else min(timeout, self.policies[tenant].wall_time_s)
        job = ClusterJob(tenant, request, wall, observer, self._loop.create_future())
        self._scheduler.admit(job)
        job.future.add_done_callback(lambda _: self._job_done(job))
        self._pump()
        result: Result = await job.answer
        return result

    def stream(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
    ) -> Any:
        """As ``Sandbox.stream``: ``async for out in sb.stream(code)`` yields ``sandbox.Output`` as written."""
        from sandbox.stream import RunStream

        return RunStream(lambda observer: self.execute(code, inputs, tenant=tenant, timeout=timeout, observer=observer))

    def session(self, tenant: str = DEFAULT_TENANT) -> ClusterSession:
        """As ``Sandbox.session``: runs sharing one namespace, in one worker on one node."""
        from sandbox.cluster.session import ClusterSession

        return ClusterSession(self, tenant)

    def check_open(self, tenant: str) -> None:
        if self._state != "open":
            raise SandboxClosed("the cluster sandbox is not running (use it inside 'async with ClusterSandbox(...)')")
        if tenant not in self.policies:
            known = ", ".join(repr(name) for name in sorted(self.policies))
            raise SandboxError(f"unknown tenant {tenant!r}; this sandbox serves {known}")

    async def run_workflow(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Mapping[str, object]] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
    ) -> dict[str, dict[str, object]]:
        """Run a built workflow; each of its code nodes is routed like a run."""
        from sandbox.workflow import run_workflow

        return await run_workflow(self, workflow, parameters, tenant=tenant, timeout=timeout)

    def _refuse_if_unservable(self, tenant: str) -> None:
        """Fail closed at once when every node refused the tenant."""
        nodes = [node for node in self._nodes.values() if node.up]
        if nodes and all(tenant in node.refused for node in nodes):
            reasons = "; ".join(f"node {node.node_id} ({node.host}): {node.refused[tenant]}" for node in nodes)
            raise ConfinementUnavailable(
                f"no node of the cluster can confine tenant {tenant!r}: {reasons}",
                layer="",
                reason=reasons,
            )

    def serving(self, tenant: TenantQueue) -> list[Node]:
        """The nodes up now that confine ``tenant``."""
        return [node for node in self._nodes.values() if node.up and tenant.name not in node.refused]

    def _gate_of(self, tenant: TenantQueue) -> frozenset[str]:
        """A waiting tenant's gate (``Scheduler.pick``): the nodes that serve it.

        Worked out again for every tenant whenever a node joins, leaves,
        goes down or up, or reports what it refuses (``touch_all``).
        """
        return frozenset(node.node_id for node in self.serving(tenant))

    def _gate_is_open(self, gate: Hashable) -> bool:
        assert isinstance(gate, frozenset)
        return any(
            (node := self._nodes.get(node_id)) is not None and node.up and node.in_flight < node.capacity
            for node_id in gate
        )

    def _pump(self) -> None:
        """Send every run that can start now, in the scheduler's order, to its node."""
        if self._state != "open":
            return
        while (tenant := self._scheduler.pick(self._gate_of, self._gate_is_open)) is not None:
            node = routing.choose(tenant.name, self.serving(tenant))
            assert node is not None  # its gate is open: one of its nodes has a free slot
            job = self._scheduler.started(tenant)
            assert isinstance(job, ClusterJob)
            node.in_flight += 1
            self.dispatched += 1
            self._running[job] = node
            task = self._loop.create_task(self._call(job, node))
            self._calls[job] = task
            task.add_done_callback(functools.partial(self._forget_call, job))

    def _forget_call(self, job: Job, _: asyncio.Task[None]) -> None:
        self._calls.pop(job, None)

    async def _call(self, job: ClusterJob, node: Node) -> None:
        """Send one run to its node, and end it with the node's outcome or NodeLost.

        A node that does not answer within ``_ANSWER_GRACE_S`` past the
        run's wall-clock limit (which the node enforces) is treated as lost
        for that run, so that a hung or cut-off node cannot leave a run
        waiting for ever; it gets no more runs until its agent answers again.
        """
        answer_within = job.wall_time_s + _ANSWER_GRACE_S
        try:
            async with asyncio.timeout(answer_within):
                if job.output_to is None:
                    outcome = await call_agent(node.agent.call, node, job.request)
                else:
                    outcome = await stream_from_agent(node.agent.stream, node, job.output_to, job.request)
        except _RAY_FAILURES as exc:
            self.lose(node, f"its agent failed: {type(exc).__name__}")
            return
        except TimeoutError:
            node.up = False
            self._scheduler.touch_all()
            job.fail(
                lost(node, f"no answer within {answer_within:g} s, {_ANSWER_GRACE_S:g} s past its wall-clock limit")
            )
            return
        if isinstance(outcome, Result):
            if not job.answer.done():
                job.answer.set_result(outcome)
        else:
            job.fail(outcome)

    def _job_done(self, job: Job) -> None:
        """Every run passes here exactly once. A cancelled queued run is withdrawn."""
        node = self._running.pop(job, None)
        if node is not None:
            node.in_flight -= 1
            self._scheduler.finished(job)
            if job.future.cancelled() and job in self._calls:
                self._calls[job].cancel()  # which cancels the run on its node
        elif job.future.cancelled():
            self._scheduler.withdraw(job)
        self._pump()


def lost(node: Node, why: str) -> NodeLost:
    return NodeLost(
        f"node {node.node_id} was lost while this run was in flight ({why}); "
        "it was not run again, since it may have had effects",
        node=node.node_id,
    )


def encode_run(
    op: str, code: str, inputs: Mapping[str, object] | None, timeout: float | None, **fields: object
) -> bytes:
    """A run request, checked as ``Sandbox.run`` checks its arguments."""
    if not isinstance(code, str):
        raise InputError(f"code must be a str, not {type(code).__name__}")
    if timeout is not None and not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if inputs is not None and not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a mapping of variable names to values, not {type(inputs).__name__}")
    try:
        return protocol.encode_request(op, code=code, inputs=dict(inputs or {}), timeout=timeout, **fields)
    except Exception as exc:
        raise InputError(f"the run's inputs cannot be serialized: {type(exc).__name__}: {exc}") from exc


def _outcome(node: Node, reply: bytes) -> Result | SandboxError:
    try:
        outcome = protocol.decode_reply(reply)
    except protocol.ProtocolError as exc:
        return SandboxError(f"node {node.node_id} sent a malformed reply: {exc}")
    if isinstance(outcome, dict):
        return SandboxError(f"node {node.node_id} answered a run with an event")
    return outcome


async def call_agent(method: Any, node: Node, *arguments: object) -> Result | SandboxError:
    """One agent call; a cancelled caller cancels the remote call too (and so the run)."""
    ref = method.remote(*arguments)
    try:
        reply = await ref
    except asyncio.CancelledError:
        ray.cancel(ref)
        raise
    return _outcome(node, reply)


async def stream_from_agent(
    method: Any, node: Node, observer: OutputObserver, *arguments: object
) -> Result | SandboxError:
    """One streamed agent call: each event goes to ``observer``; returns the outcome."""
    replies = method.options(num_returns="streaming").remote(*arguments)
    try:
        async for ref in replies:
            reply = await ref
            if not protocol.is_event(reply):
                return _outcome(node, reply)
            event = protocol.decode_reply(reply)
            assert isinstance(event, dict)
            observer(_STREAMS.get(event.get("stream", ""), 0), str(event.get("text", "")), float(event.get("at", 0.0)))
    except asyncio.CancelledError:
        ray.cancel(replies)
        raise
    return SandboxError(f"node {node.node_id} ended a stream without its outcome")
