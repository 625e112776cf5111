"""Each process below the supervisor says in ``ps`` what it is and for which
tenant, and no command line carries the zygote's config."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from sandbox import Sandbox
from tests.conftest import descendants, quick_policy
from tests.hostile.client import HARNESS, UNPRIVILEGED_UID, HarnessProcess, unprivileged_unavailable

UNPRIVILEGED = unprivileged_unavailable()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().rstrip("\n")


def _titles() -> dict[int, tuple[str, bytes]]:
    """pid -> (comm, command line) of every process below this one."""
    titles = {}
    for process in descendants():
        try:
            titles[process.pid] = (_comm(process.pid), _cmdline(process.pid))
        except FileNotFoundError:
            pass  # exited meanwhile
    return titles


async def test_each_process_is_titled_by_role_and_tenant_and_no_config_is_on_a_command_line() -> None:
    async with Sandbox(quick_policy(), tenants={"free": quick_policy()}, workers=2) as sandbox:
        free = await sandbox.run("x = 1", tenant="free")
        default = await sandbox.run("x = 1")
        titles = _titles()
        by_title = {cmdline.rstrip(b"\0"): comm for comm, cmdline in titles.values()}

        for comm, cmdline in titles.values():
            assert b"{" not in cmdline and b"supervisor_pid" not in cmdline, cmdline
            assert comm.startswith("sandbox-"), (comm, cmdline)
        assert titles[free.stats.worker_pid] == ("sandbox-worker", b"sandbox-worker tenant=free\0")
        assert titles[default.stats.worker_pid] == ("sandbox-worker", b"sandbox-worker tenant=default\0")
        assert by_title[b"sandbox-zygote"] == "sandbox-zygote"
        assert by_title[b"sandbox-launcher"] == "sandbox-launche"  # comm holds 15 bytes
        assert by_title[b"sandbox-inits"] == "sandbox-inits"
        # The workers are the zygote's children; their inits are the init forker's, the
        # zygote's other kind of child. Each init bears its tenant, which the zygote hands
        # it as the pair leaves standby: it may read it a moment later.
        zygote = psutil.Process(free.stats.worker_pid).parent()
        assert zygote is not None and _comm(zygote.pid) == "sandbox-zygote"
        (forker,) = [p for p in zygote.children() if _comm(p.pid) == "sandbox-inits"]
        wanted = {b"sandbox-init tenant=free\0", b"sandbox-init tenant=default\0"}
        deadline = time.monotonic() + 10
        while not wanted <= (inits := _inits(forker)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert wanted <= inits, inits


def _inits(forker: psutil.Process) -> set[bytes]:
    return {_cmdline(p.pid) for p in forker.children() if _comm(p.pid) == "sandbox-init"}


@pytest.mark.skipif(UNPRIVILEGED is not None, reason=f"unprivileged harness unavailable: {UNPRIVILEGED}")
def test_an_unprivileged_pool_is_titled_too() -> None:
    """As uid 65534 the zygote runs in a user namespace; its processes are titled the same way."""
    harness = HarnessProcess({"default": {}, "free": {}}, unprivileged=True)
    try:
        assert harness.run("x = 1", tenant="free")["outcome"] == "ok"
        below = psutil.Process(harness.pid).children(recursive=True)
        (launcher,) = [p for p in below if _cmdline(p.pid) == b"sandbox-launcher\0"]
        supervisor = launcher.parent()
        assert supervisor is not None and HARNESS.name in " ".join(supervisor.cmdline())
        assert supervisor.uids().real == UNPRIVILEGED_UID
        wanted = {b"sandbox-launcher\0", b"sandbox-zygote\0", b"sandbox-worker tenant=free\0"}
        deadline = time.monotonic() + 10
        while True:
            pool = {p.pid: (_comm(p.pid), _cmdline(p.pid)) for p in supervisor.children(recursive=True)}
            if wanted | {b"sandbox-init tenant=free\0"} <= {cmdline for _, cmdline in pool.values()}:
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.05)
        for comm, cmdline in pool.values():
            assert comm.startswith("sandbox-") and cmdline.startswith(b"sandbox-"), (comm, cmdline)
            assert b"{" not in cmdline, cmdline
    finally:
        harness.close()
