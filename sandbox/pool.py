"""The worker processes, bound to tenants on demand: running slots and warm ones.

Owns: how many workers may run at once (``slots``: busy workers, never
more) and start at once on runs' behalf (as many again), which tenant each worker belongs
to, which are idle, and how many idle ("warm") workers are kept: at most
``max_idle`` and ``idle_memory_bytes`` of their private memory in all,
the least recently used retired first. Each change to a tenant's idle or
starting workers is reported (``on_tenant_change``): the scheduler's
gates depend on them (``sandbox.scheduler``). Also spawning through the zygote
(restarting it if it ever dies), retiring workers that asked for it or
sat idle too long, and the workers dedicated to one owner (a session),
which hold a running slot for the owner's life and are never idle in the
pool nor reused (``start_dedicated``/``retire_dedicated``).

Why two bounds: a running worker costs a CPU, an idle one only memory, and
most of that memory is shared copy-on-write with the zygote. When one
number bounded both, every tenant beyond the number of CPUs paid a worker
start for each of its runs; with the two apart, a hundred tenants keep a
warm worker each on two CPUs.

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
from sandbox.runtime import linux
from sandbox.worker import Listener, State, WorkerProcess
from sandbox.zygote import Zygote

_PAGE = 4096
# A worker's charge until one has been measured: a little over a trivial tenant's
# worker (~2 MiB by its cgroup, ~3.5 MiB by smaps_rollup), so that an unmeasured
# budget errs towards fewer warm workers.
_UNMEASURED_CHARGE = 4 * 1024 * 1024


class Pool:
    def __init__(
        self,
        slots: int,
        profiles: dict[str, TenantProfile],
        zygote: Zygote,
        zygote_factory: Callable[[], Awaitable[Zygote]],
        on_change: Callable[[], None],
        on_tenant_change: Callable[[str], None],
        on_spawn_failed: Callable[[str, BaseException], None],
        *,
        max_idle: int,
        idle_memory_bytes: int,
    ) -> None:
        self.slots = slots
        self.max_idle = max_idle
        self.idle_memory_bytes = idle_memory_bytes
        self._profiles = profiles
        self._zygote = zygote
        self._zygote_factory = zygote_factory
        self._zygote_lock = asyncio.Lock()
        self._on_change = on_change
        self._on_tenant_change = on_tenant_change
        self._on_spawn_failed = on_spawn_failed
        self._ids = itertools.count(1)
        self.workers: set[WorkerProcess] = set()
        self.running: set[WorkerProcess] = set()  # taken by a run (or a session) and not given back yet
        self._idle: dict[str, list[WorkerProcess]] = {name: [] for name in profiles}
        # Every idle worker, least recently used first (a dict keeps insertion order).
        self._lru: dict[WorkerProcess, None] = {}
        self._idle_bytes = 0
        self._typical_charge = _UNMEASURED_CHARGE
        self._starting: dict[str, int] = dict.fromkeys(profiles, 0)
        self._starting_total = 0
        self._starting_for_runs = 0  # starts on a waiting run's behalf
        self._spawn_tasks: set[asyncio.Task[None]] = set()
        self._measurements: set[asyncio.Future[int]] = set()  # workers' private memory, read in threads
        self._owners: dict[WorkerProcess, Listener] = {}  # dedicated workers and who they serve
        self.last_spawn_error: BaseException | None = None

    # --- questions the supervisor asks --------------------------------------

    def has_idle(self, tenant: str) -> bool:
        return bool(self._idle[tenant])

    def idle_count(self, tenant: str) -> int:
        return len(self._idle[tenant])

    def starting(self, tenant: str) -> int:
        return self._starting[tenant]

    def has_slot(self) -> bool:
        """Whether one more run may start on an idle worker."""
        return len(self.running) < self.slots

    def may_start_for_run(self, *, first_of_tenant: bool) -> bool:
        """Whether one more worker may start on a waiting run's behalf.

        Into a free slot, always. Beyond it only the first worker of a
        tenant that has none running or starting, and no more such starts
        at once than there are slots: a start is mostly waiting (on the
        zygote, on the kernel building namespaces), so it may overlap the
        runs in the slots, which matters when every run needs a new worker
        (more tenants than warm workers). A tenant whose workers are all
        busy gets no extra one beyond the slots: they come free soon.
        """
        if len(self.running) + self._starting_for_runs < self.slots:
            return True
        return first_of_tenant and self._starting_for_runs < self.slots

    def has_warm_room(self) -> bool:
        """Whether one more worker could be kept warm without retiring another."""
        return len(self._lru) + self._starting_total < self.max_idle and self._idle_bytes < self.idle_memory_bytes

    # --- actions -----------------------------------------------------------------

    def take_idle(self, tenant: str) -> WorkerProcess | None:
        """An idle worker of ``tenant``, now counted as running until released or lost."""
        idle = self._idle[tenant]
        if not idle:
            return None
        worker = idle.pop()  # most recently used: warmest caches
        self._forget_idle(worker)
        self.running.add(worker)
        self._on_tenant_change(tenant)
        return worker

    def spawn(self, tenant: str, *, for_run: bool = True) -> None:
        """Start a worker for ``tenant`` in the background; it counts at once.

        ``for_run``: a run is waiting for it (see ``may_start_for_run``);
        a worker prepared ahead of need is bounded by the warm budget only.
        """
        worker = WorkerProcess(next(self._ids), self._profiles[tenant], self)
        self.workers.add(worker)
        self._starting[tenant] += 1
        self._starting_total += 1
        self._starting_for_runs += for_run
        self._on_tenant_change(tenant)
        task = asyncio.get_running_loop().create_task(self._start(worker, for_run))
        self._spawn_tasks.add(task)
        task.add_done_callback(self._spawn_tasks.discard)

    async def _start(self, worker: WorkerProcess, for_run: bool) -> None:
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
            self._keep_idle(worker)
        finally:
            self._starting[worker.tenant] -= 1
            self._starting_total -= 1
            self._starting_for_runs -= for_run
            self._on_tenant_change(worker.tenant)
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

    def trim_idle(self) -> None:
        """Retire least recently used idle workers until the warm budget holds.

        Called after the supervisor has handed out the workers that runs
        were waiting for, so a worker started for a run is never retired
        before that run takes it.
        """
        while self._lru and (len(self._lru) > self.max_idle or self._idle_bytes > self.idle_memory_bytes):
            self.retire(next(iter(self._lru)))

    def retire_idle_since(self, deadline: float) -> None:
        while self._lru and (oldest := next(iter(self._lru))).idle_since < deadline:
            self.retire(oldest)

    def retire(self, worker: WorkerProcess) -> None:
        worker.kill()
        self._forget(worker)

    def _keep_idle(self, worker: WorkerProcess) -> None:
        """Count ``worker`` idle; every caller then has the supervisor pump, which trims the budget."""
        if worker.runs <= 1:  # until its first run is measured, the last worker's figure stands in
            worker.memory_charge = self._typical_charge
        self._idle[worker.tenant].append(worker)
        self._on_tenant_change(worker.tenant)
        self._lru[worker] = None
        self._idle_bytes += worker.memory_charge
        if worker.runs == 1:  # after its first run (imports)
            self._measure(worker)

    def _measure(self, worker: WorkerProcess) -> None:
        """Charge ``worker`` the memory it holds that no other process shares.

        A worker in a memory cgroup of its own is charged what the kernel
        charged that group (every page it allocated or copied from the
        zygote, its tmpfs files, its page tables): one small read, done here.
        Otherwise ``smaps_rollup`` tells its own pages from those it still
        shares copy-on-write, but reading it walks the worker's page tables,
        about 0.4 ms here, which on the event loop would stall every other
        run and delay the one that just ended (its caller resumes after this
        callback). So that read happens in a thread, and until its figure
        arrives the last measured worker's stands in, and its arrival has
        the supervisor pump again.
        """
        if worker.memory_usage_file is not None:
            try:
                charged = int(linux.read_file(worker.memory_usage_file, 64))
            except (OSError, ValueError):
                pass  # measured below, as a worker without a cgroup of its own
            else:
                self._charge(worker, charged)
                return
        task = asyncio.ensure_future(asyncio.to_thread(_private_bytes, worker.pid))
        self._measurements.add(task)
        task.add_done_callback(lambda done: self._charge_measured(worker, done))

    def _charge_measured(self, worker: WorkerProcess, done: asyncio.Future[int]) -> None:
        self._measurements.discard(done)
        if not done.cancelled() and done.exception() is None and worker.state is not State.DEAD:
            self._charge(worker, done.result())
            self._on_change()  # the warm budget may be over now: the supervisor's pump trims it

    def _charge(self, worker: WorkerProcess, charge: int) -> None:
        self._typical_charge = charge
        if worker in self._lru:
            self._idle_bytes += charge - worker.memory_charge
        worker.memory_charge = charge

    def _forget_idle(self, worker: WorkerProcess) -> None:
        del self._lru[worker]
        self._idle_bytes -= worker.memory_charge

    def _forget(self, worker: WorkerProcess) -> None:
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        self.running.discard(worker)
        if worker in self._lru:
            self._forget_idle(worker)
            self._idle[worker.tenant].remove(worker)
            self._on_tenant_change(worker.tenant)

    # --- workers dedicated to one owner --------------------------------------------------

    async def start_dedicated(self, tenant: str, owner: Listener) -> WorkerProcess:
        """Start a worker of ``tenant`` for ``owner`` alone, in a free slot (the caller checks there is one).

        It holds a running slot from its start to its end, like a run that
        never finishes, so it counts against ``slots``; it is never idle in
        the pool, never handed to a run and never evicted: ``owner`` hears of
        its releases and its loss, and gives it back with ``retire_dedicated``,
        which ends it.
        """
        worker = WorkerProcess(next(self._ids), self._profiles[tenant], self, dedicated=True)
        self.workers.add(worker)
        self.running.add(worker)
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
        self.running.discard(worker)
        if retire:
            self.retire(worker)
        else:
            self._keep_idle(worker)
        self._on_change()

    def worker_lost(self, worker: WorkerProcess) -> None:
        self._forget(worker)
        owner = self._owners.pop(worker, None)
        if owner is not None:
            owner.worker_lost(worker)
        self._on_change()

    # --- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        for measurement in list(self._measurements):
            measurement.cancel()
        for task in list(self._spawn_tasks):
            task.cancel()
        await asyncio.gather(*self._spawn_tasks, return_exceptions=True)
        for worker in list(self.workers):
            worker.kill()
        self.workers.clear()
        self.running.clear()
        await self._zygote.close()


def _start_error(worker: WorkerProcess, exc: BaseException) -> SandboxError:
    if isinstance(exc, SandboxError):
        return exc
    return SandboxError(f"could not start a worker for tenant {worker.tenant!r}: {exc}")


def _private_bytes(pid: int) -> int:
    """Memory a worker holds that no other process shares (what retiring it frees).

    ``smaps_rollup`` separates the pages still shared copy-on-write with the
    zygote from the worker's own. Where it cannot be read (a supervisor
    without the right to inspect its workers), the resident size stands in:
    an overestimate, so the budget errs on the side of fewer warm workers.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            total = 0
            for line in f:
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
            return total
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
