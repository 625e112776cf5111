"""A stateful session on a cluster: its runs share one worker on one node.

Owns: ``ClusterSession``, what ``ClusterSandbox.session()`` returns: the
node it lives on (chosen like a run's, holding one of that node's slots for
its life), the calls that reach the node's own ``Session`` through the
node agent, and how it ends when its node is lost.

Must never: move. A session's state lives in one worker process; if its
node or agent is lost the state is gone, so a run in flight then ends with
``NodeLost`` and every later call with ``SessionLost``. Nothing is re-run
elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sandbox.cluster import protocol
from sandbox.cluster.client import _RAY_FAILURES, OutputObserver, call_agent, encode_run, lost, stream_from_agent
from sandbox.errors import SandboxError, SessionLost
from sandbox.result import Result

if TYPE_CHECKING:
    from sandbox.cluster.client import ClusterSandbox, Node


class ClusterSession:
    """``async with sb.session(tenant=...) as s:`` then ``s.run(...)``/``s.stream(...)``, as on a Sandbox."""

    def __init__(self, cluster: ClusterSandbox, tenant: str) -> None:
        self.tenant = tenant
        self.node: Node | None = None
        self._cluster = cluster
        self._session_id = ""
        self._ended: SandboxError | None = None
        # One call at a time to the agent, in submission order: a session's runs are sequential
        # anyway, and this keeps its calls within the agent's max_pending_calls.
        self._turn = asyncio.Lock()

    async def __aenter__(self) -> ClusterSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._ended is not None

    async def open(self) -> None:
        if self.node is not None or self._ended is not None:
            raise SandboxError("a session can be opened only once; call ClusterSandbox.session() for another")
        node = self.node = self._cluster.take_session_slot(self.tenant)
        self._cluster.sessions.add(self)
        try:
            session_id, reply = await node.agent.open_session.remote(
                protocol.encode_request("session", tenant=self.tenant)
            )
        except _RAY_FAILURES as exc:
            self._cluster.lose(node, f"its agent failed: {type(exc).__name__}")
            raise lost(node, "while the session was opening") from None
        except BaseException:
            self.lose("it did not open")
            raise
        if not session_id:
            self.lose("it did not open")
            error = protocol.decode_reply(reply)
            raise error if isinstance(error, SandboxError) else SandboxError("the node could not open the session")
        self._session_id = session_id

    async def close(self) -> None:
        """End the session; its worker on the node is retired."""
        node, ended = self.node, self._ended
        self.lose("this session was closed; open a new one with ClusterSandbox.session()")
        if node is not None and ended is None and self._session_id:
            try:
                await node.agent.close_session.remote(self._session_id)
            except _RAY_FAILURES:
                pass  # the agent is gone, and the session with it

    def lose(self, why: str) -> None:
        """The session is over (closed, or its node lost): give back its slot, refuse later calls."""
        if self._ended is not None:
            return
        self._ended = SessionLost(f"{why}; its state is gone, open a new session")
        self._cluster.sessions.discard(self)
        if self.node is not None:
            self._cluster.give_back_session_slot(self.node, self.tenant)

    async def run(
        self, code: str, inputs: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> Result:
        """Run ``code`` in the session's namespace, after the runs submitted before it."""
        return await self._call(code, inputs, timeout, None)

    def stream(self, code: str, inputs: Mapping[str, object] | None = None, *, timeout: float | None = None) -> Any:
        """``run`` with its output delivered as written (see ``Sandbox.stream``)."""
        from sandbox.stream import RunStream

        return RunStream(lambda observer: self._call(code, inputs, timeout, observer))

    async def _call(
        self, code: str, inputs: Mapping[str, object] | None, timeout: float | None, observer: OutputObserver | None
    ) -> Result:
        async with self._turn:
            return await self._call_in_turn(code, inputs, timeout, observer)

    async def _call_in_turn(
        self, code: str, inputs: Mapping[str, object] | None, timeout: float | None, observer: OutputObserver | None
    ) -> Result:
        if self._ended is not None:
            raise self._ended
        node = self.node
        assert node is not None, "open the session first (async with sb.session() as s)"
        try:
            if observer is None:
                request = encode_run("run", code, inputs, timeout)
                outcome = await call_agent(node.agent.session_call, node, self._session_id, request)
            else:
                request = encode_run("stream", code, inputs, timeout)
                outcome = await stream_from_agent(node.agent.session_stream, node, observer, self._session_id, request)
        except _RAY_FAILURES as exc:
            why = f"its agent failed: {type(exc).__name__}"
            self._cluster.lose(node, why)
            raise lost(node, why) from None
        if isinstance(outcome, SessionLost):
            self.lose("the node ended it")
        if isinstance(outcome, SandboxError):
            raise outcome
        return outcome
