"""The node supervisor: one ``Sandbox`` per cluster node, served on a Unix socket.

Owns: finding which tenants this node can confine (fail closed per node),
the one Sandbox that runs them, and the socket its node agent forwards runs
to. Started by the agent as ``python -m sandbox.cluster.node SOCKET``; reads
one JSON line of configuration on stdin (``{"tenants": {name: policy},
"workers": n, "node": id}``), answers one JSON line on stdout (what it
serves and refuses, or the error that stopped it), then serves until its
stdin closes.

Why a process of its own rather than a Sandbox in the agent's event loop:
Ray runs actor code in a non-main thread of a threaded process, where
signal handlers cannot be installed, ``PR_SET_PDEATHSIG`` fires when the
forking *thread* ends and forking without exec can hang. Here the Sandbox
runs on the main thread of a fresh, single-threaded process, as it does
anywhere else, with all its guarantees: its zygote and workers die with it.
It in turn dies with its agent: stdin is a pipe from the agent, so the
agent's death, however it comes, is an end of file here, and the Sandbox is
closed (every worker stopped) before the process exits.

Must never: serve a tenant whose required layers this node lacks, or take
requests from anyone but its agent (the socket is in a private directory).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvloop

from sandbox.cluster import protocol
from sandbox.errors import ConfinementUnavailable, SandboxError
from sandbox.policies.model import Policy
from sandbox.profile import build_profile
from sandbox.result import Result
from sandbox.supervisor import Sandbox


async def serve(socket_path: str, config: dict[str, Any], announce: Callable[[dict[str, Any]], None]) -> None:
    policies = {name: Policy(**fields) for name, fields in config["tenants"].items()}
    node = str(config["node"])
    layers, refused = await _probe(policies)
    servable = {name: policy for name, policy in policies.items() if name not in refused}
    sandbox = Sandbox(tenants=servable, workers=config["workers"])
    await sandbox.start()
    try:
        handler = _Handler(sandbox, node, refused)
        server = await asyncio.start_unix_server(handler.serve, socket_path)
        announce({"capacity": sandbox.capacity, "layers": layers, "refused": refused, "host": socket.gethostname()})
        await _agent_gone()
        server.close()
    finally:
        await sandbox.close()
        shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)  # the agent's private directory


async def _probe(policies: dict[str, Policy]) -> tuple[dict[str, str], dict[str, str]]:
    """This node's layers, and each tenant it must refuse with the reason.

    The probe is the one every Sandbox runs at start (its result is cached
    for the process, so the real Sandbox does not probe again).
    """
    async with Sandbox(Policy(required_layers=[]), workers=1) as probe:
        host = probe.host
    assert host is not None
    refused = {}
    for name, policy in policies.items():
        try:
            build_profile(name, policy, host)
        except ConfinementUnavailable as exc:
            refused[name] = str(exc)
    return dict(host.layers), refused


async def _agent_gone() -> None:
    """Return when stdin ends (the agent died or let go) or on SIGTERM."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not done.done():
            done.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = loop.create_task(reader.read())
    eof.add_done_callback(lambda _: stop())
    await done
    eof.cancel()


class _Handler:
    """One connection is one unit of work: a run, a stream, or a whole session.

    The peer closing the connection while a request is answered means the
    caller stopped waiting: the run is cancelled (its worker killed), as
    when a task awaiting ``Sandbox.run`` is cancelled.
    """

    def __init__(self, sandbox: Sandbox, node: str, refused: dict[str, str]) -> None:
        self.sandbox = sandbox
        self.node = node
        self.refused = refused

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            payload = await protocol.read_frame(reader, protocol.MAX_REQUEST_BYTES)
            if payload is None:
                return
            request = protocol.decode_request(payload)
            if request["op"] == "session":
                await self._session(request, reader, writer)
            else:
                await self._answer_unless_gone(request, None, reader, writer)
        except (protocol.ProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _session(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Open a session, then answer its runs on this connection until it closes."""
        try:
            self._check_tenant(request["tenant"])
            session = self.sandbox.session(tenant=request["tenant"])
            await session.open()
        except SandboxError as exc:
            protocol.write_frame(writer, protocol.encode_error(exc))
            return
        try:
            protocol.write_frame(writer, protocol.encode_event(opened=True))
            await writer.drain()
            while (payload := await protocol.read_frame(reader, protocol.MAX_REQUEST_BYTES)) is not None:
                if not await self._answer_unless_gone(protocol.decode_request(payload), session, reader, writer):
                    return
        finally:
            await session.close()

    async def _answer_unless_gone(
        self, request: dict[str, Any], session: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False (the run cancelled) if the peer left first.

        The outcome is written only once the watch on the reader has
        stopped: the peer may send its next request as soon as it has the
        outcome, and the watch must not take that request's first byte.
        """
        loop = asyncio.get_running_loop()
        answer = loop.create_task(self._answer(request, session, writer))
        peer_gone = loop.create_task(reader.read(1))  # nothing may arrive before the outcome
        await asyncio.wait({answer, peer_gone}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            peer_gone.cancel()
            await asyncio.gather(peer_gone, return_exceptions=True)
            protocol.write_frame(writer, answer.result())
            await writer.drain()
            return True
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        return False

    async def _answer(self, request: dict[str, Any], session: Any, writer: asyncio.StreamWriter) -> bytes:
        """The outcome's bytes (a stream's events are written on the way)."""
        op = request["op"]
        try:
            if session is None:
                self._check_tenant(request["tenant"])
            if op == "run":
                result = await self._run(request, session)
            elif op == "stream":
                result = await self._stream(request, session, writer)
            else:
                raise SandboxError(f"unknown request {op!r}")
        except SandboxError as exc:
            return protocol.encode_error(exc)
        except ConnectionError:
            raise
        except Exception as exc:  # a bug here must still end the run with one outcome
            return protocol.encode_error(SandboxError(f"node supervisor failed: {type(exc).__name__}: {exc}"))
        return protocol.encode_result(result, self.node)

    def _check_tenant(self, tenant: str) -> None:
        if tenant in self.refused:
            raise ConfinementUnavailable(self.refused[tenant], layer="", reason=self.refused[tenant])

    async def _run(self, request: dict[str, Any], session: Any) -> Result:
        if session is not None:
            result: Result = await session.run(request["code"], request["inputs"], timeout=request["timeout"])
            return result
        return await self.sandbox.execute(
            request["code"],
            request["inputs"],
            tenant=request["tenant"],
            timeout=request["timeout"],
            allow_await=request["allow_await"],
            filename=request["filename"],
        )

    async def _stream(self, request: dict[str, Any], session: Any, writer: asyncio.StreamWriter) -> Result:
        """Send each piece of output as an event as the run writes it; return its Result."""
        code, inputs, timeout = request["code"], request["inputs"], request["timeout"]
        if session is not None:
            stream = session.stream(code, inputs, timeout=timeout)
        else:
            stream = self.sandbox.stream(code, inputs, tenant=request["tenant"], timeout=timeout)
        async for piece in stream:
            protocol.write_frame(writer, protocol.encode_event(stream=piece.stream, text=piece.text, at=piece.at))
            await writer.drain()
        result: Result = stream.result
        return result


def main() -> None:
    socket_path = sys.argv[1]
    config = json.loads(sys.stdin.readline())

    def announce(report: dict[str, Any]) -> None:
        print(json.dumps(report), flush=True)

    try:
        uvloop.run(serve(socket_path, config, announce))
    except Exception as exc:
        announce({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
