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
from collections.abc import AsyncIterator
from typing import Any

from sandbox.cluster import protocol
from sandbox.errors import SandboxError

MAX_REPLY_BYTES = 1024 * 1024 * 1024


class NodeAgent:
    """Made a Ray actor by ``ClusterSandbox`` (this module never imports ray)."""

    def __init__(self, tenants: dict[str, dict[str, Any]], workers: int | None, node: str) -> None:
        self._directory = tempfile.mkdtemp(prefix="sandbox-node-")  # mode 0700: only this uid connects
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
        self._report = {**report, "node": node, "supervisor_pid": self._process.pid, "agent_pid": os.getpid()}

    async def describe(self) -> dict[str, Any]:
        """What this node serves: capacity, layers, refused tenants (with why), pids."""
        return self._report

    async def call(self, request: bytes) -> bytes:
        """Forward one request (a run) and return its reply bytes."""
        reader, writer = await self._connect()
        try:
            protocol.write_frame(writer, request)
            await writer.drain()
            reply = await protocol.read_frame(reader, MAX_REPLY_BYTES)
        except (ConnectionError, protocol.ProtocolError):
            reply = None
        finally:
            writer.close()
        if reply is None:
            self._supervisor_lost()
        return reply  # type: ignore[return-value]  # _supervisor_lost does not return

    async def stream(self, request: bytes) -> AsyncIterator[bytes]:
        """Forward a stream request; yield each event's bytes, then the outcome's."""
        reader, writer = await self._connect()
        try:
            protocol.write_frame(writer, request)
            await writer.drain()
            while (reply := await protocol.read_frame(reader, MAX_REPLY_BYTES)) is not None:
                yield reply
                if not protocol.is_event(reply):
                    return
        except (ConnectionError, protocol.ProtocolError):
            pass
        finally:
            writer.close()
        self._supervisor_lost()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self._socket)
        except OSError:
            self._supervisor_lost()
            raise

    def _supervisor_lost(self) -> None:
        """The supervisor died: die too, so that Ray restarts this agent with a new one."""
        if self._process.poll() is None:
            raise SandboxError("the node supervisor closed a connection without replying")
        os._exit(1)
