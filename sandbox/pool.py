"""The bounded set of worker processes, bound to tenants on demand.

Owns: how many workers exist (never more than ``capacity``, counting those
still starting), which tenant each belongs to, which are idle, spawning
through the zygote (restarting it if it ever dies), retiring workers that
asked for it or sat idle too long, or whose slot another tenant needs, and
the workers dedicated to one owner (a session), which are never idle in the
pool and never reused (``start_dedicated``/``retire_dedicated``).

Must never: give one tenant's worker to another tenant (a worker is
confined for its tenant at birth, and its memory may hold that tenant's
data), or choose what runs next: that is the scheduler's call, made by the
supervisor.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from sandbox.errors import SandboxError
from sandbox.profile import TenantProfile
from sandbox.worker import Listener, WorkerProcess
from sandbox.zygote import Zygote


class Pool:
    def __init__(
        self,
        capacity: int,
        profiles: dict[str, TenantProfile],
        zygote: Zygote,
        zygote_factory: Callable[[], Awaitable[Zygote]],
        on_change: Callable[[], None],
        on_spawn_failed: Callable[[str, BaseException], None],
    ) -> None:
        self.capacity = capacity
        self._profiles = profiles
        self._zygote = zygote
        self._zygote_factory = zygote_factory
        self._zygote_lock = asyncio.Lock()
        self._on_change = on_change
        self._on_spawn_failed = on_spawn_failed
        self._ids = itertools.count(1)
        self.workers: set[WorkerProcess] = set()
        self._idle: dict[str, list[WorkerProcess]] = {name: [] for name in profiles}
        self._starting: dict[str, int] = dict.fromkeys(profiles, 0)
        self._held: dict[str, int] = dict.fromkeys(profiles, 0)
        self._spawn_tasks: set[asyncio.Task[None]] = set()
        self._owners: dict[WorkerProcess, Listener] = {}  # dedicated workers and who they serve
        self.last_spawn_error: BaseException | None = None

    # --- questions the supervisor asks --------------------------------------

    def has_idle(self, tenant: str) -> bool:
        return bool(self._idle[tenant])

    def idle_count(self, tenant: str) -> int:
        return len(self._idle[tenant])

    def starting(self, tenant: str) -> int:
        return self._starting[tenant]

    def starting_anywhere(self) -> bool:
        return any(self._starting.values())

    def has_room(self) -> bool:
        return len(self.workers) < self.capacity

    def held(self, tenant: str) -> int:
        """Workers of ``tenant``, starting ones included."""
        return self._held[tenant]

    # --- actions -----------------------------------------------------------------

    def take_idle(self, tenant: str) -> WorkerProcess | None:
        idle = self._idle[tenant]
        return idle.pop() if idle else None  # most recently used: warmest caches

    def idle_victim(self, may_take: Callable[[WorkerProcess], bool]) -> WorkerProcess | None:
        """The longest-idle worker that ``may_take`` accepts."""
        candidates = [w for workers in self._idle.values() for w in workers if may_take(w)]
        return min(candidates, key=lambda w: w.idle_since, default=None)

    def spawn(self, tenant: str) -> None:
        """Start a worker for ``tenant`` in the background; it counts at once."""
        worker = WorkerProcess(next(self._ids), self._profiles[tenant], self)
        self.workers.add(worker)
        self._held[tenant] += 1
        self._starting[tenant] += 1
        task = asyncio.get_running_loop().create_task(self._start(worker))
        self._spawn_tasks.add(task)
        task.add_done_callback(self._spawn_tasks.discard)

    async def _start(self, worker: WorkerProcess) -> None:
        try:
            zygote = await self._live_zygote()
            await worker.start(zygote)
        except asyncio.CancelledError:
            worker.kill()
            self._forget(worker)
            raise
        except BaseException as exc:
            worker.kill()
            self._forget(worker)
            error = _start_error(worker, exc)
            self.last_spawn_error = error
            self._on_spawn_failed(worker.tenant, error)
        else:
            self._idle[worker.tenant].append(worker)
        finally:
            self._starting[worker.tenant] -= 1
        self._on_change()

    async def wait_started(self) -> None:
        """Wait for every worker being spawned to be ready (or to have failed)."""
        await asyncio.gather(*self._spawn_tasks, return_exceptions=True)

    async def _live_zygote(self) -> Zygote:
        async with self._zygote_lock:
            if not self._zygote.alive:
                await self._zygote.close()
                self._zygote = await self._zygote_factory()
            return self._zygote

    def retire_idle_since(self, deadline: float) -> None:
        for workers in self._idle.values():
            for worker in [w for w in workers if w.idle_since < deadline]:
                self.retire(worker)

    def retire(self, worker: WorkerProcess) -> None:
        worker.kill()
        self._forget(worker)

    def _forget(self, worker: WorkerProcess) -> None:
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        self._held[worker.tenant] -= 1
        idle = self._idle[worker.tenant]
        if worker in idle:
            idle.remove(worker)

    # --- workers dedicated to one owner --------------------------------------------------

    async def start_dedicated(self, tenant: str, owner: Listener) -> WorkerProcess:
        """Start a worker of ``tenant`` for ``owner`` alone, in a free slot (the caller makes room).

        It counts against the capacity and the tenant's holding like any
        worker, but it is never idle in the pool, never handed to a run and
        never evicted: ``owner`` hears of its releases and its loss, and
        gives it back with ``retire_dedicated``, which ends it.
        """
        worker = WorkerProcess(next(self._ids), self._profiles[tenant], self, dedicated=True)
        self.workers.add(worker)
        self._held[tenant] += 1
        self._owners[worker] = owner
        try:
            await worker.start(await self._live_zygote())
        except asyncio.CancelledError:
            self.retire_dedicated(worker)
            raise
        except BaseException as exc:
            self.retire_dedicated(worker)
            raise _start_error(worker, exc) from None
        return worker

    def retire_dedicated(self, worker: WorkerProcess) -> None:
        self._owners.pop(worker, None)
        self.retire(worker)
        self._on_change()

    # --- WorkerProcess listener ------------------------------------------------------

    def worker_released(self, worker: WorkerProcess, *, retire: bool) -> None:
        owner = self._owners.get(worker)
        if owner is not None:
            owner.worker_released(worker, retire=retire)
            return
        if retire:
            self.retire(worker)
        else:
            self._idle[worker.tenant].append(worker)
        self._on_change()

    def worker_lost(self, worker: WorkerProcess) -> None:
        self._forget(worker)
        owner = self._owners.pop(worker, None)
        if owner is not None:
            owner.worker_lost(worker)
        self._on_change()

    # --- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        for task in list(self._spawn_tasks):
            task.cancel()
        await asyncio.gather(*self._spawn_tasks, return_exceptions=True)
        for worker in list(self.workers):
            worker.kill()
        self.workers.clear()
        await self._zygote.close()


def _start_error(worker: WorkerProcess, exc: BaseException) -> SandboxError:
    if isinstance(exc, SandboxError):
        return exc
    return SandboxError(f"could not start a worker for tenant {worker.tenant!r}: {exc}")
