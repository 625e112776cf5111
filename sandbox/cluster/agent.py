"""The node agent: a Ray actor pinned to one node, owning that node's supervisor.

Owns: starting the node supervisor process (``sandbox.cluster.node``) on
its node, reporting what it serves and refuses, and forwarding request
bytes to it and reply bytes back, one Unix-socket connection per call.

Must never: decode a reply (the client does, see ``protocol``), run code
itself, or outlive its supervisor silently. If the supervisor process is
gone, the agent exits the hard way so that Ray restarts it (``max_restarts``)
with a fresh supervisor; the calls it had in flight fail in the client as
``NodeLost`` and are never run again.

The supervisor is started with fork+exec (``subprocess``), never a bare
fork of this threaded process, in a session of its own, with a pipe on its
stdin that only this process holds: when this process dies the pipe closes
and the supervisor shuts its Sandbox down (see ``sandbox.cluster.node``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import psutil

from sandbox.cluster import protocol
from sandbox.errors import SandboxError

MAX_REPLY_BYTES = 1024 * 1024 * 1024
_DIRECTORY_PREFIX = "sandbox-node-"
_SUPERVISOR_EXIT_S = 2.0


class NodeAgent:
    """Made a Ray actor by ``ClusterSandbox`` (this module never imports ray)."""

    def __init__(self, tenants: dict[str, dict[str, Any]], workers: int | None, node: str) -> None:
        _remove_stale_directories()
        # Mode 0700: only this uid connects. Named by this process, so that a
        # later agent can tell the directory of a dead one.
        self._directory = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")
        self._socket = os.path.join(self._directory, "supervisor.sock")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.cluster.node", self._socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        config = {"tenants": tenants, "workers": workers, "node": node}
        self._process.stdin.write(json.dumps(config).encode() + b"\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        report = json.loads(line) if line.strip() else {"error": "the node supervisor exited before it was ready"}
        if "error" in report:
            self._process.wait()
            shutil.rmtree(self._directory, ignore_errors=True)
            raise SandboxError(f"node {node}: the node supervisor did not start: {report['error']}")
        self._sessions: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Lock]] = {}
        self._report = {**report, "node": node, "supervisor_pid": self._process.pid, "agent_pid": os.getpid()}

    async def describe(self) -> dict[str, Any]:
        """What this node serves: capacity, layers, refused tenants (with why), pids.

        Asked about once a second by each client: an agent whose supervisor
        has died goes down here, rather than with the next run sent to it.
        """
        if self._process.poll() is not None:
            os._exit(1)
        return self._report

    async def call(self, request: bytes) -> bytes:
        """Forward one run and return its outcome's bytes."""
        reader, writer = await self._connect()
        try:
            return await self._exchange(reader, writer, request)
        finally:
            writer.close()

    async def stream(self, request: bytes) -> AsyncIterator[bytes]:
        """Forward a streamed run; yield each event's bytes, then the outcome's.

        Cancelled by the client (``ray.cancel``), it closes the connection,
        which cancels the run on the node.
        """
        reader, writer = await self._connect()
        try:
            async for reply in self._relay(reader, writer, request):
                yield reply
        finally:
            writer.close()

    # --- sessions: one connection each, kept open here for the session's life ------------

    async def open_session(self, request: bytes) -> tuple[str, bytes]:
        """Open a session on the node: its id (empty if it did not open) and the node's answer."""
        reader, writer = await self._connect()
        reply = await self._exchange(reader, writer, request, final=False)
        if not protocol.is_event(reply):
            writer.close()
            return "", reply
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = (reader, writer, asyncio.Lock())
        return session_id, reply

    async def session_call(self, session_id: str, request: bytes) -> bytes:
        entry = self._sessions.get(session_id)
        if entry is None:
            return _session_gone()
        reader, writer, turn = entry
        async with turn:
            return await self._exchange(reader, writer, request)

    async def session_stream(self, session_id: str, request: bytes) -> AsyncIterator[bytes]:
        entry = self._sessions.get(session_id)
        if entry is None:
            yield _session_gone()
            return
        reader, writer, turn = entry
        async with turn:
            async for reply in self._relay(reader, writer, request):
                yield reply

    async def close_session(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id, None)
        if entry is not None:
            entry[1].close()

    # --- plumbing ---------------------------------------------------------------------------

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, final: bool = True
    ) -> bytes:
        protocol.write_frame(writer, request)
        await writer.drain()
        reply = await self._next(reader)
        if final and protocol.is_event(reply):
            self._supervisor_lost()
        return reply

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> AsyncIterator[bytes]:
        """Send a stream request; yield every event, then the outcome."""
        protocol.write_frame(writer, request)
        await writer.drain()
        while True:
            reply = await self._next(reader)
            yield reply
            if not protocol.is_event(reply):
                return

    async def _next(self, reader: asyncio.StreamReader) -> bytes:
        try:
            reply = await protocol.read_frame(reader, MAX_REPLY_BYTES)
        except (ConnectionError, protocol.ProtocolError):
            reply = None
        if reply is None:
            self._supervisor_lost()
        return reply

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self._socket)
        except OSError:
            self._supervisor_lost()

    def _supervisor_lost(self) -> NoReturn:
        """The supervisor died: die too, so that Ray restarts this agent with a new one.

        Its connections close a moment before it can be reaped, hence the
        short wait (this agent is going away either way).
        """
        try:
            self._process.wait(timeout=_SUPERVISOR_EXIT_S)
        except subprocess.TimeoutExpired:
            raise SandboxError("the node supervisor broke off a reply") from None
        os._exit(1)


def _session_gone() -> bytes:
    """The answer for a session this agent does not hold (it was restarted since, or it was closed)."""
    from sandbox.errors import SessionLost

    return protocol.encode_error(
        SessionLost("this node agent holds no such session (it was restarted, or the session closed); open a new one")
    )


def _remove_stale_directories() -> None:
    """Remove the socket directories of agents of this uid that died.

    An agent killed with its supervisor (Ray kills a dead worker's children)
    cannot remove its own; the next agent on the node does. A directory
    whose agent pid is alive (even reused by another process) is kept.
    """
    parent = tempfile.gettempdir()
    for entry in os.scandir(parent):
        name = entry.name
        if not name.startswith(_DIRECTORY_PREFIX):
            continue
        pid = name[len(_DIRECTORY_PREFIX) :].split("-", 1)[0]
        try:
            stale = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.geteuid()
        except OSError:
            continue
        if stale and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
