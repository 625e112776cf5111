"""Host side of the template process that forks every worker.

Owns: starting the launcher (see ``runtime.zygote`` for the process tree),
the control socket to it, spawn requests, and the exit reports it sends back.

Must never: block the event loop (the control socket is non-blocking and
read by a loop callback), or pass a secret to the zygote: every worker is a
copy of the zygote's memory, so anything the zygote ever held could be read
by a later tenant. Environment values go to each worker over its own channel.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sandbox
from sandbox import leftovers
from sandbox.cgroups import CgroupParents
from sandbox.runtime.zygote import SCRATCH_PREFIX

# The launcher imports the very ``sandbox`` package this supervisor runs:
# its parent directory goes first on the path (-I leaves none of ours). Its
# only other argument is the control socket's fd: the config is the first
# message on that socket, off the world-readable command line.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from sandbox.runtime.zygote import main; main(sys.argv[2:])"
_PACKAGE_ROOT = str(Path(sandbox.__file__).parent.parent)
_START_TIMEOUT_S = 30.0
_MAX_EVENT_BYTES = 64 * 1024
# Native thread pools that read their size from the environment when they load.
# The zygote keeps them at one thread. It preloads every allowed module, so a
# pool sized from the CPU count would start its threads in the process that
# forks every worker, and each worker would then fail to restart them under
# its thread budget (OpenBLAS spins when that happens). Pools a worker loads
# itself are sized to its tenant's budget (``sandbox.profile``).
NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
USERNS_INSIDE_ID = 1000  # the uid/gid workers see inside the user namespace when unprivileged
_STANDBY_WORKERS = 2  # forked ahead of need by the zygote, so that a spawn costs no fork
_STANDBY_MEMORY_BYTES = 64 * 1024 * 1024


class SpawnFailed(Exception):
    """The zygote could not fork a worker; ``layer`` names the layer it could not build, if that was why."""

    def __init__(self, reason: str, layer: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.layer = layer


@dataclass(frozen=True)
class Spawned:
    """A worker the zygote forked: pidfds of its namespace's init (the worker's
    own where it has no PID namespace) and of the worker, and the cgroups it
    joined, one per hierarchy (none when no hierarchy is delegated)."""

    init: int
    worker: int
    cgroups: tuple[str, ...]


@dataclass(frozen=True)
class ExitInfo:
    """How a worker process ended, as reported by the zygote that reaped it."""

    status: int
    cpu_s: float
    maxrss_kb: int
    oom_killed: bool

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name} ({self.signal})"
        return f"exited with code {self.exit_code}"


class Zygote:
    """One launcher + zygote pair; forks workers on request."""

    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._process = process
        self._control = control
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._spawns: dict[int, asyncio.Future[Spawned]] = {}
        self._exit_watchers: dict[int, Callable[[ExitInfo], None]] = {}
        self.alive = True
        self.namespaces: dict[str, Any] = {}
        self._loop.add_reader(control.fileno(), self._on_readable)

    @classmethod
    async def start(cls, *, preload: list[str], cgroups: CgroupParents | None) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "supervisor_pid": os.getpid(),
            "owner": leftovers.owner_tag(),
            "scratch_root": leftovers.HOST_TMP,
            "userns": None
            if os.geteuid() == 0
            else {"uid": os.geteuid(), "gid": os.getegid(), "inside_id": USERNS_INSIDE_ID},
            "preload": preload,
            "standby": _STANDBY_WORKERS,
            # Standby workers wait in groups of their own under these limits
            # until a spawn request writes the tenant's.
            "standby_cgroups": None
            if cgroups is None
            else cgroups.worker_limits(max_tasks=1, memory_bytes=_STANDBY_MEMORY_BYTES),
        }
        try:
            ours.send(json.dumps(config).encode())  # queued for the launcher; a fresh socket has room
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-X",
                "utf8",
                "-c",
                _BOOT,
                _PACKAGE_ROOT,
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                env=dict.fromkeys(NATIVE_THREAD_VARIABLES, "1"),
                cwd="/",
                # Out of the terminal's process group: Ctrl-C at a prompt
                # (sandbox shell) interrupts the supervisor, never the zygote.
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = cls(process, ours)
        try:
            ready = await asyncio.wait_for(asyncio.shield(zygote._ready), _START_TIMEOUT_S)
        except BaseException:
            await zygote.close()
            raise
        zygote.namespaces = ready
        return zygote

    async def spawn(
        self, worker_id: int, config: dict[str, Any], fds: list[int], on_exit: Callable[[ExitInfo], None]
    ) -> Spawned:
        """Fork a worker that owns ``fds``; return pidfds of its init and of itself, and its groups."""
        if not self.alive:
            raise SpawnFailed("the zygote is not running")
        future: asyncio.Future[Spawned] = self._loop.create_future()
        self._spawns[worker_id] = future
        self._exit_watchers[worker_id] = on_exit
        message = pickle.dumps({"op": "spawn", "worker_id": worker_id, "config": config})
        try:
            await self._send(message, fds)
            return await future
        except BaseException:
            self._spawns.pop(worker_id, None)
            self._exit_watchers.pop(worker_id, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                spawned = future.result()
                os.close(spawned.init)
                os.close(spawned.worker)
            raise

    async def _send(self, message: bytes, fds: list[int]) -> None:
        while True:
            try:
                socket.send_fds(self._control, [message], fds)
                return
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self._control.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self._control.fileno())

    def _on_readable(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._control, _MAX_EVENT_BYTES, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._died()
                return
            self._dispatch(json.loads(data), fds)

    def _dispatch(self, event: dict[str, Any], fds: list[int]) -> None:
        op = event["op"]
        if op == "ready":
            if not self._ready.done():
                self._ready.set_result(event)
            return
        worker_id = event["worker_id"]
        if op == "spawned":
            future = self._spawns.pop(worker_id, None)
            if future is None or future.done() or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                return
            future.set_result(Spawned(fds[0], fds[1], tuple(map(str, event.get("cgroups", ())))))
        elif op == "spawn_failed":
            future = self._spawns.pop(worker_id, None)
            self._exit_watchers.pop(worker_id, None)
            if future is not None and not future.done():
                future.set_exception(SpawnFailed(event["reason"], event.get("layer")))
        elif op == "exited":
            watcher = self._exit_watchers.pop(worker_id, None)
            if watcher is not None:
                watcher(ExitInfo(event["status"], event["cpu_s"], event["maxrss_kb"], event["oom"]))

    def _died(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._loop.remove_reader(self._control.fileno())
        error = SpawnFailed("the zygote exited")
        if not self._ready.done():
            self._ready.set_exception(error)
        for future in self._spawns.values():
            if not future.done():
                future.set_exception(error)
        self._spawns.clear()

    async def close(self) -> None:
        """Stop the zygote; every worker it forked dies with it."""
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self._control.fileno())
        self._control.close()  # the zygote exits on EOF, taking its PID namespace along
        if self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), 2.0)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        for future in self._spawns.values():
            if not future.done():
                future.set_exception(SpawnFailed("the zygote was closed"))
        self._spawns.clear()
        self._exit_watchers.clear()


def _remove_dead_scratch(dead: frozenset[str]) -> bool:
    """Worker scratch directories whose supervisor died before its zygote could remove them."""
    try:
        entries = list(os.scandir(leftovers.HOST_TMP))
    except OSError:
        return True
    left = False
    for entry in entries:
        if leftovers.owner_in(entry.name, SCRATCH_PREFIX) in dead and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # never follows a symlink a worker left inside
            left |= os.path.lexists(entry.path)
    return not left


leftovers.register("worker scratch directories", _remove_dead_scratch)
