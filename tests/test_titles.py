"""Each process below the supervisor says in ``ps`` what it is and for which
tenant, and no command line carries the zygote's config."""

from __future__ import annotations

import asyncio
import time

import psutil

from sandbox import Sandbox
from tests.conftest import descendants, quick_policy


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
        # Each worker's init is its sibling (both are the zygote's children) and bears its tenant,
        # which the zygote hands it as the pair leaves standby: it may read it a moment later.
        zygote = psutil.Process(free.stats.worker_pid).parent()
        assert zygote is not None and _comm(zygote.pid) == "sandbox-zygote"
        wanted = {b"sandbox-init tenant=free\0", b"sandbox-init tenant=default\0"}
        deadline = time.monotonic() + 10
        while not wanted <= (inits := _inits(zygote)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert wanted <= inits, inits


def _inits(zygote: psutil.Process) -> set[bytes]:
    return {_cmdline(p.pid) for p in zygote.children() if _comm(p.pid) == "sandbox-init"}
