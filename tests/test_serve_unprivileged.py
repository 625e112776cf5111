"""``sandbox serve`` as uid 65534: the HTTP service on the unprivileged path.

The server runs the way an operator without root would run it, in a
throwaway PID namespace (``tests.hostile.client.unprivileged_command``), on
127.0.0.1 and a port of its own. The tests speak to it over HTTP only, and
check that it serves runs, that it and its workers hold no privilege, and
that hostile code sent through the API is contained as it is in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.hostile import attacks
from tests.hostile.attacks import escaped
from tests.hostile.client import (
    UNPRIVILEGED_UID,
    kill_namespace,
    stage_sources,
    unprivileged_command,
    unprivileged_unavailable,
)
from tests.serving import Server, running_server

UNAVAILABLE = unprivileged_unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"unprivileged harness unavailable: {UNAVAILABLE}")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    stage = stage_sources()
    # The policy and key files must be readable by uid 65534.
    directory = Path(tempfile.mkdtemp(prefix="serve-unprivileged-"))
    os.chmod(directory, 0o755)
    boot = f"import sys; sys.path.insert(0, {stage!r}); from sandbox.cli import main; sys.exit(main())"
    try:
        with running_server(directory, launcher=unprivileged_command(stage, ["-c", boot])) as running:
            try:
                yield running
            finally:
                _stop(running)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


def _stop(server: Server) -> None:
    """A SIGTERM to unshare does not reach the server: the server itself is
    asked to drain and stop, and its namespace is killed if it does not."""
    for process in _service_processes(server):
        if "serve" in process.cmdline():
            process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_namespace(server.process)


def _run(server: Server, code: str, inputs: dict | None = None) -> dict:
    body = {"code": code, "inputs": inputs or {}}
    response = httpx.post(f"{server.url}/v1/runs", json=body, headers=server.headers(), timeout=60)
    assert response.status_code == 200, response.text
    answer: dict = response.json()
    return answer


def _service_processes(server: Server) -> list[psutil.Process]:
    """The server (the supervisor) and everything below it: zygote, standbys, workers.

    ``server.process`` is ``unshare``, which stays outside the namespace; the shell and
    ``setpriv`` between them exec into the server."""
    return psutil.Process(server.process.pid).children(recursive=True)


def test_runs_are_served_and_nothing_of_the_service_holds_root(server: Server) -> None:
    body = _run(server, "x = 6 * 7")
    assert body["ok"] and body["outputs"] == {"x": 42}, body
    processes = _service_processes(server)
    titles = {" ".join(p.cmdline())[:40] for p in processes}
    assert any("sandbox-worker" in title for title in titles), titles
    for process in processes:
        assert process.uids().real != 0 and process.uids().effective != 0, (process.cmdline(), process.uids())


def test_the_service_process_runs_as_uid_65534(server: Server) -> None:
    serving = [p for p in _service_processes(server) if "serve" in p.cmdline()]
    assert serving, "the server process was not found below the namespace"
    assert {p.uids().real for p in serving} == {UNPRIVILEGED_UID}


@pytest.mark.parametrize(
    ("code", "outcomes"),
    [
        (escaped("random_os", attacks.FORK_LOOP), {"CodeError"}),
        # Its parent is the init of its own PID namespace: at most the worker itself dies.
        (escaped("random_os", attacks.KILL_PARENT), {"CodeError", "WorkerCrashed"}),
        ("open('/etc/shadow').read()", {"CodeError"}),
        (escaped("random_os", attacks.TCP_CONNECT), {"CodeError"}),
    ],
    ids=["fork", "kill-parent", "read-shadow", "connect"],
)
def test_hostile_code_through_the_api_is_contained(server: Server, code: str, outcomes: set[str]) -> None:
    # The port of the server itself: the one listener certain to be there.
    body = _run(server, code, {"port": int(server.url.rsplit(":", 1)[1])})
    assert not body["ok"] and body["error"]["type"] in outcomes, body
    assert _run(server, "y = 1")["outputs"] == {"y": 1}  # and the service goes on serving
