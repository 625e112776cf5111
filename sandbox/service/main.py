"""Running ``sandbox serve``: uvicorn on uvloop and httptools, and the drain on SIGTERM.

Owns: the listening socket (bound before uvicorn starts, so that port 0
works and the real address is printed), the uvicorn server, and shutdown.

Shutdown, step by step: the first SIGTERM (or SIGINT) starts the drain:
requests that would start work, and ``/readyz``, get 503 while requests
and polled runs in flight finish, up to the drain timeout; then uvicorn
stops (closing the listener and idle connections) and the lifespan closes
the Sandbox, which fails whatever still runs with ``SandboxClosed`` and
stops every worker. A second signal stops at once (the Sandbox is still
closed on the way out). The process then exits 0.

Must never: exit with a worker or the zygote still alive (``Sandbox.close``
is on every way out), or listen on anything but loopback without API keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from types import FrameType

import uvicorn

from sandbox.service.app import Service, ServiceConfig, create_app

# How long an idle keep-alive connection is kept open. Clients must drop idle
# connections sooner (sandbox.client does after 5 s): when the server closes a
# connection just as the client sends a request on it, the request is lost in
# transit, and the client cannot know whether it may safely send it again.
KEEP_ALIVE_S = 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Called by uvicorn's signal handler. The first signal drains, a second one stops at once.

        The signal is not recorded for uvicorn to raise again on its way out:
        a drained service exits 0.
        """
        if self._drain is None:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(self._start_drain)
            return
        self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        print("sandbox serve: draining", file=sys.stderr, flush=True)
        await self.service.drain()
        self.should_exit = True


def serve(config: ServiceConfig, host: str, port: int, metrics_port: int | None = None) -> int:
    """Serve until drained; 0 on a clean shutdown."""
    app, service = create_app(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    bound_host, bound_port = sock.getsockname()[:2]
    uv_config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_S,
        backlog=2048,
    )
    server = _DrainingServer(uv_config, service)
    if metrics_port is not None:
        service.metrics.serve_on_port(host, metrics_port)
    print(f"sandbox serve: listening on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("sandbox serve: stopped", file=sys.stderr, flush=True)
    return 0 if server.started else 1
