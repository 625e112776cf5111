"""The supervisor: ``Sandbox`` takes runs and drives them to one outcome each.

Owns: the life of a Sandbox (start: zygote, layer probe, tenant profiles,
pre-started workers; close: no run left waiting, no process left behind),
admission of runs, the dispatch loop that matches the scheduler's choice of
tenant with the pool's workers, cancellation, the watchdog, and the opening
of sessions (which take a worker of their own out of the pool: see
``sandbox.session``).

::

    run() ──▶ Scheduler.admit ──▶ _pump ──▶ Pool: on a free running slot, an idle
      ▲        (quotas, FIFO,       │         worker of that tenant, or spawn one (the
      │         fair share)         │         warm budget retires the least recently used)
      │                             ▼
      └── outcome.to_result ◀── WorkerProcess.begin ── channel ──▶ worker
                                   (wall timer, output cap, token)

Must never: do blocking work on the event loop thread. Every worker fd is
served by loop callbacks; large outputs are decoded in a thread; the only
synchronous system calls made on the loop are short ones (non-blocking
reads and writes, pidfd signals, and the watchdog's reads of ``/proc``).
It also runs on whatever asyncio loop it is embedded in; it picks uvloop
only when it owns the loop (``run_sync``, the CLI).
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING

import psutil

from sandbox import leftovers, outcome, values
from sandbox.cgroups import CgroupParents
from sandbox.errors import InputError, QuotaExceeded, SandboxClosed, SandboxError
from sandbox.files import check_files
from sandbox.idlewatch import IdleCpuWatch
from sandbox.inputs import encode_inputs
from sandbox.job import Job, OutputObserver
from sandbox.layers import probe
from sandbox.mounts import check_mounts
from sandbox.policies.model import Policy
from sandbox.pool import Pool
from sandbox.profile import HostSupport, TenantProfile, build_profile
from sandbox.result import Result
from sandbox.runtime import linux
from sandbox.scheduler import Scheduler, TenantQueue
from sandbox.session import Session
from sandbox.stats import SandboxStats, TenantStats
from sandbox.stream import RunStream
from sandbox.worker import State, WorkerProcess
from sandbox.zygote import Zygote

if TYPE_CHECKING:
    from sandbox.workflow import Workflow

DEFAULT_TENANT = "default"
_WATCHDOG_PERIOD_S = 0.05
_FRESH_SPARES = 2  # workers ready or starting for an active fresh-process tenant
_SPARE_AFTER_S = 0.05  # a run this long gets its tenant a spare worker (see _prepare_replacement)
DEFAULT_MAX_IDLE_WORKERS = 256
DEFAULT_IDLE_MEMORY_SHARE = 8  # idle workers may keep 1/8 of the host's memory by default...
DEFAULT_IDLE_MEMORY_CAP_MB = 2048  # ...and never more than this
MiB = 1024 * 1024


class _Wait(enum.Enum):
    """The gate a waiting tenant's next run is behind (``Scheduler.pick``): each is one shared resource."""

    SLOT = "a free running slot, for an idle worker of the tenant"
    START = "room to start one more worker for a run"
    FIRST_START = "room to start a tenant's first worker, which may overlap the slots' runs"


class Sandbox:
    """Runs code nodes in confined, pooled worker processes.

    ``policy`` is the default tenant's policy; ``tenants`` maps further
    tenant names to theirs. ``workers`` bounds the runs in flight at once,
    shared by all tenants (default: the number of CPUs). Between runs each
    tenant keeps its workers warm: at most ``max_idle_workers`` idle workers
    in all (default 256) holding at most ``idle_memory_mb`` of private
    memory (default: an eighth of the host's memory, at most 2048 MB), the
    least recently used retired first, and none idle for longer than
    ``idle_timeout_s``.
    Use it as ``async with Sandbox(...) as sb: await sb.run(code, inputs)``.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        tenants: Mapping[str, Policy] | None = None,
        workers: int | None = None,
        max_idle_workers: int = DEFAULT_MAX_IDLE_WORKERS,
        idle_memory_mb: int | None = None,
        idle_timeout_s: float | None = 300.0,
    ) -> None:
        policies = tenant_policies(policy, tenants)
        if workers is not None and workers < 1:
            raise SandboxError("workers must be at least 1")
        if max_idle_workers < 0:
            raise SandboxError("max_idle_workers must be 0 or more (0: no worker is kept between runs)")
        if idle_memory_mb is not None and idle_memory_mb < 0:
            raise SandboxError("idle_memory_mb must be 0 or more")
        self.policies = policies
        self.capacity = workers or os.cpu_count() or 2
        self.max_idle_workers = max_idle_workers
        self.idle_memory_mb = _default_idle_memory_mb() if idle_memory_mb is None else idle_memory_mb
        self._idle_timeout_s = idle_timeout_s
        self._state = "new"
        self._running: dict[Job, WorkerProcess] = {}
        self._sessions: set[Session] = set()
        self._profiles: dict[str, TenantProfile] = {}
        self._scheduler = Scheduler(policies)
        self._pool: Pool | None = None
        self._cgroups: CgroupParents | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.host: HostSupport | None = None

    # --- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise SandboxError("a Sandbox can be started only once")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        # Workers of an unprivileged supervisor share its uid. Not dumpable,
        # its /proc files belong to root and it cannot be ptraced by them.
        linux.set_dumpable(False)
        try:
            await asyncio.to_thread(leftovers.sweep)  # what supervisors killed before closing left on the host
            cgroup_error = None
            try:
                self._cgroups = await asyncio.to_thread(CgroupParents.create)
            except OSError as exc:
                cgroup_error = exc.strerror or str(exc)
            zygote = await self._new_zygote()
            try:
                wants_egress = any(policy.egress for policy in self.policies.values())
                self.host = await probe(zygote, self._cgroups, cgroup_error, egress=wants_egress)
                self._profiles = {
                    name: build_profile(name, policy, self.host) for name, policy in self.policies.items()
                }
                for name, policy in self.policies.items():
                    check_mounts(name, policy, self.host.root)
                allowed = [pattern for policy in self.policies.values() for pattern in policy.allowed_modules]
                await asyncio.to_thread(values.preload, allowed)
            except BaseException:
                await zygote.close()
                raise
            self._pool = Pool(
                self.capacity,
                self._profiles,
                zygote,
                self._new_zygote,
                self._pump,
                self._scheduler.touch,
                self._spawn_failed,
                max_idle=self.max_idle_workers,
                idle_memory_bytes=self.idle_memory_mb * MiB,
            )
            for _ in range(min(self.capacity, self.max_idle_workers)):
                self._pool.spawn(DEFAULT_TENANT)
            await self._pool.wait_started()
            if self._pool.last_spawn_error is not None and not self._pool.has_idle(DEFAULT_TENANT):
                raise self._pool.last_spawn_error
        except BaseException:
            await self._teardown()
            self._state = "closed"
            raise
        self._watchdog = self._loop.create_task(self._watch())
        self._state = "open"

    async def _new_zygote(self) -> Zygote:
        preload = sorted(
            {pattern.removesuffix(".*") for policy in self.policies.values() for pattern in policy.allowed_modules}
        )
        return await Zygote.start(preload=preload, cgroups=self._cgroups)

    async def close(self) -> None:
        """Fail queued and running runs with SandboxClosed and stop every process."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        self._pump()  # wakes sessions waiting to open, which now see the sandbox closing
        for session in list(self._sessions):
            session._end(SandboxClosed("the sandbox was closed, which ended this session"))
        for job in self._scheduler.drain():
            job.fail(SandboxClosed("the sandbox was closed before this run started"))
        for worker in list(self._running.values()):
            worker.fail_run(
                lambda out, err: SandboxClosed(
                    "the sandbox was closed while this run was in flight", stdout=out, stderr=err
                )
            )
        await self._teardown()
        self._state = "closed"

    async def _teardown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
        if self._cgroups is not None:
            await asyncio.to_thread(self._cgroups.remove)

    # --- runs -------------------------------------------------------------------

    async def run(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
        filename: str = "<code>",
        files: Mapping[str, bytes] | None = None,
    ) -> Result:
        """Run ``code`` with ``inputs`` bound as variables; return its outputs.

        ``timeout`` may shorten the tenant's ``wall_time_s``, never extend it.
        ``filename`` is what tracebacks call the code (a file's name, say).
        ``files`` maps relative paths to bytes written under the run's working
        directory before it starts; what it leaves in ``./out/`` comes back in
        ``Result.files`` (see README, "Files for one run"). Raises a
        ``SandboxError`` subclass for every way a run can fail.
        """
        return await self.execute(code, inputs, tenant=tenant, timeout=timeout, filename=filename, files=files)

    def stream(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
        filename: str = "<code>",
        files: Mapping[str, bytes] | None = None,
    ) -> RunStream:
        """``run``, with its output delivered as it is written: ``async for out in sb.stream(code)``.

        Each item is a ``sandbox.Output``; when the loop ends, the stream's
        ``result`` is the Result ``run`` would have returned. See
        ``sandbox.stream`` for failures, limits and leaving the loop early.
        """
        return RunStream(
            lambda observer: self.execute(
                code, inputs, tenant=tenant, timeout=timeout, filename=filename, observer=observer, files=files
            )
        )

    def session(self, tenant: str = DEFAULT_TENANT) -> Session:
        """A stateful session: ``async with sb.session() as s: await s.run(code)``.

        Its runs share one namespace in one worker of their own; see
        ``sandbox.session``. Opening it raises ``QuotaExceeded`` naming the
        limit that stopped it.
        """
        return Session(self, tenant)

    async def execute(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
        allow_await: bool = True,
        filename: str = "<code>",
        observer: OutputObserver | None = None,
        on_start: Callable[[], object] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> Result:
        """``run`` with the knobs workflows, streams and the HTTP service need:
        sync-only code, a named filename, an observer of the output as it is
        written, and ``on_start``, called once when a worker takes the run (a
        polled run reports ``queued`` until then)."""
        profile, job = self._new_job(code, inputs, tenant, timeout, allow_await, filename, observer, files)
        job.on_start = on_start
        self._scheduler.admit(job)
        job.future.add_done_callback(lambda _: self._job_done(job))
        self._pump()
        completed = await job.future
        return await outcome.to_result(completed, profile)

    def _profile(self, tenant: str) -> TenantProfile:
        if self._state != "open":
            raise SandboxClosed("the sandbox is not running (use it inside 'async with Sandbox(...)')")
        profile = self._profiles.get(tenant)
        if profile is None:
            known = ", ".join(repr(name) for name in sorted(self._profiles))
            raise SandboxError(
                f"unknown tenant {tenant!r}: this sandbox serves {known}; define it in Sandbox(tenants=...)"
            )
        return profile

    def _new_job(
        self,
        code: str,
        inputs: Mapping[str, object] | None,
        tenant: str,
        timeout: float | None,
        allow_await: bool,
        filename: str,
        observer: OutputObserver | None,
        files: Mapping[str, bytes] | None = None,
    ) -> tuple[TenantProfile, Job]:
        profile = self._profile(tenant)
        if not isinstance(code, str):
            raise InputError(f"code must be a str, not {type(code).__name__}")
        wall = profile.policy.wall_time_s
        if timeout is not None:
            if not timeout > 0:
                raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
            wall = min(wall, timeout)
        future = self._loop.create_future()
        checked = check_files(files, profile.policy)
        return profile, Job(tenant, code, encode_inputs(inputs), allow_await, filename, wall, future, observer, checked)

    async def run_workflow(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Mapping[str, object]] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
    ) -> dict[str, dict[str, object]]:
        """Run a built workflow of code nodes; see ``sandbox.workflow``."""
        from sandbox.workflow import run_workflow

        return await run_workflow(self, workflow, parameters, tenant=tenant, timeout=timeout)

    # --- sessions -----------------------------------------------------------------

    async def _open_session(self, session: Session) -> WorkerProcess:
        """A new worker of the session's tenant for the session alone, or QuotaExceeded.

        A session does not queue for a worker: the limits that stop it are
        the operator's (``max_sessions``, ``max_concurrency``, the pool's
        size), so it says which one at once, as admission does for runs. It
        needs a free running slot (``workers``), which it holds for its
        life; idle warm workers hold none, so they never stand in its way.
        The session's worker is always a new process, one no run has used.
        """
        profile = self._profile(session.tenant)
        tenant, policy, pool = self._scheduler.tenants[session.tenant], profile.policy, self._open_pool
        if tenant.sessions >= policy.max_sessions:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} already has {tenant.sessions} sessions open, its max_sessions; "
                "close one or raise the limit",
                tenant=tenant.name,
                quota="max_sessions",
            )
        cap = policy.max_concurrency
        if cap is not None and tenant.in_flight + tenant.sessions >= cap:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} has {tenant.in_flight} runs in flight and {tenant.sessions} sessions open, "
                f"its max_concurrency of {cap}; retry later",
                tenant=tenant.name,
                quota="max_concurrency",
            )
        if not pool.has_slot():
            raise QuotaExceeded(
                f"all {pool.slots} running slots of this sandbox are taken by runs and sessions "
                "(Sandbox(workers=...)); retry later",
                tenant=tenant.name,
                quota="workers",
            )
        tenant.sessions += 1
        self._scheduler.touch(tenant.name)
        try:
            worker = await pool.start_dedicated(tenant.name, session)
        except BaseException:
            tenant.sessions -= 1
            self._scheduler.touch(tenant.name)
            self._pump()
            raise
        if self._state != "open":  # closed while the worker started
            self._close_session(session, worker)
            raise SandboxClosed("the sandbox was closed while this session was opening")
        self._sessions.add(session)
        return worker

    def _close_session(self, session: Session, worker: WorkerProcess) -> None:
        """End a session's worker (never reused) and give its places back."""
        self._sessions.discard(session)
        self._scheduler.tenants[session.tenant].sessions -= 1
        self._scheduler.touch(session.tenant)
        if self._pool is not None:
            self._pool.retire_dedicated(worker)

    async def _run_dedicated(self, worker: WorkerProcess, profile: TenantProfile, job: Job) -> Result:
        """Run ``job`` on a session's worker: no queue, no scheduler slot (the session holds one)."""
        self._running[job] = worker
        job.future.add_done_callback(lambda _: self._dedicated_job_done(job))
        worker.begin(job)
        completed = await job.future
        return await outcome.to_result(completed, profile)

    def _dedicated_job_done(self, job: Job) -> None:
        worker = self._running.pop(job, None)
        if worker is not None and job.future.cancelled():
            worker.abandon(job)

    def stats(self) -> SandboxStats:
        """A read-only snapshot of the pool and of the tenants with any load (for metrics and usage reports).

        It costs in proportion to the workers and the tenants with runs,
        not to the tenants configured (see ``SandboxStats``)."""
        workers = {state.value: 0 for state in (State.STARTING, State.IDLE, State.BUSY)}
        held: dict[str, int] = {}
        for worker in self._pool.workers if self._pool is not None else ():
            if worker.state.value in workers:
                workers[worker.state.value] += 1
            held[worker.tenant] = held.get(worker.tenant, 0) + 1
        queues = self._scheduler.tenants
        loaded = held.keys() | {queue.name for queue in self._scheduler.active_tenants()}
        tenants = {
            name: TenantStats(queued=len(queues[name].queue), running=queues[name].in_flight, workers=held.get(name, 0))
            for name in loaded
        }
        return SandboxStats(capacity=self.capacity, workers=workers, tenants=tenants)

    def _job_done(self, job: Job) -> None:
        """Every run passes here exactly once, however it ended.

        A cancelled future means the caller stopped waiting: a queued run is
        withdrawn, a running one has its worker killed, freeing the slot.
        """
        worker = self._running.pop(job, None)
        if worker is not None:
            self._scheduler.finished(job)
            if job.future.cancelled():
                worker.abandon(job)
        elif job.future.cancelled():
            self._scheduler.withdraw(job)
        self._pump()

    def _pump(self) -> None:
        """Start every run that can start now, in the scheduler's order."""
        if self._state != "open" or self._pool is None:
            return
        pool, scheduler = self._pool, self._scheduler
        while (tenant := scheduler.pick(self._gate_of, self._gate_is_open)) is not None:
            worker = pool.take_idle(tenant.name)
            if worker is None:
                pool.spawn(tenant.name)
                continue
            job = scheduler.started(tenant)
            self._running[job] = worker
            worker.begin(job)
            if job.on_start is not None:
                job.on_start()
        self._keep_spares()
        pool.trim_idle()

    @property
    def _open_pool(self) -> Pool:
        """The pool, for code that runs only while the sandbox is open."""
        assert self._pool is not None
        return self._pool

    def _gate_of(self, tenant: TenantQueue) -> _Wait | None:
        """What the next run of ``tenant`` waits for: a slot for its idle
        worker, or room to start a worker for it; None while the workers
        already starting for it will take its queued runs, or its
        ``max_concurrency`` counts those starts as full.

        Everything read here about the tenant is touched when it changes:
        its workers by the pool, its queue, runs and sessions by the
        scheduler and ``_open_session``/``_close_session``.
        """
        pool = self._pool  # asked several times per run: no property call
        assert pool is not None
        if pool.has_idle(tenant.name):
            return _Wait.SLOT
        starting = pool.starting(tenant.name)
        if len(tenant.queue) <= starting:
            return None  # workers already on their way will take these runs
        cap = tenant.policy.max_concurrency
        if cap is not None and tenant.in_flight + tenant.sessions + starting >= cap:
            return None
        return _Wait.FIRST_START if tenant.in_flight + starting == 0 else _Wait.START

    def _gate_is_open(self, gate: Hashable) -> bool:
        pool = self._pool
        assert pool is not None
        if gate is _Wait.SLOT:
            return pool.has_slot()
        return pool.may_start_for_run(first_of_tenant=gate is _Wait.FIRST_START)

    def _keep_spares(self) -> None:
        """An active fresh-process tenant gets workers started ahead of its next runs.

        Each of its runs uses up a worker, and a start takes several times
        as long as a trivial run; with only one spare on its way, runs that
        follow each other wait for one start each. Spares hold no running
        slot while they start and count against the warm budget, which
        retires them first when it is full if they are the least recently used.
        """
        if not self._scheduler.active_fresh:
            return
        pool = self._open_pool
        for tenant in self._scheduler.active_fresh.values():
            while pool.has_warm_room() and pool.idle_count(tenant.name) + pool.starting(tenant.name) < _FRESH_SPARES:
                pool.spawn(tenant.name, for_run=False)

    def _prepare_replacement(self, worker: WorkerProcess) -> None:
        """Start a spare for the tenant of a long run, in case that run's worker is lost.

        A run that has gone on for a while is the kind that ends in a kill
        (a time limit, a memory limit), and the tenant's next run would then
        wait for a worker start. One start costs a few milliseconds of CPU,
        little against a run already this long; it is made only when the
        tenant has no idle or starting worker and the warm budget has room.
        """
        pool = self._pool
        assert pool is not None
        tenant = worker.tenant
        if not pool.has_idle(tenant) and not pool.starting(tenant) and pool.has_warm_room():
            pool.spawn(tenant, for_run=False)

    def _spawn_failed(self, tenant: str, error: BaseException) -> None:
        """A tenant's worker could not start: its waiting runs fail with the reason."""
        for job in self._scheduler.drain_tenant(tenant):
            job.fail(error)

    # --- watchdog ----------------------------------------------------------------

    async def _watch(self) -> None:
        """Second signals for memory and CPU, and retirement of idle workers.

        The kernel limits (RLIMIT_DATA, the memory cgroup, RLIMIT_CPU) are the
        first line; this samples busy workers' RSS and CPU time from /proc so
        that a run over its limit ends as MemoryLimitExceeded or
        TimeLimitExceeded even where a kernel limit is unavailable. Idle
        workers that use CPU all the same are ended (``sandbox.idlewatch``).
        """
        idle_cpu = IdleCpuWatch()
        processes: dict[WorkerProcess, psutil.Process] = {}
        # CPU time each run started from: the worker's own report, unless the
        # first sample is lower (a worker that lied to gain headroom loses it).
        baselines: dict[Job, float] = {}
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            now = self._loop.time()
            for job in [j for j in baselines if j not in self._running]:
                del baselines[job]
            for job, worker in list(self._running.items()):
                if worker.state is not State.BUSY or job.started_at is None or now - job.started_at < _SPARE_AFTER_S:
                    continue
                self._prepare_replacement(worker)
                try:
                    process = processes.get(worker) or processes.setdefault(worker, psutil.Process(worker.pid))
                    with process.oneshot():
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                except psutil.Error:
                    continue
                policy = worker.profile.policy
                cpu = times.user + times.system
                baseline = baselines.setdefault(job, min(worker.worker_cpu_s, cpu))
                # fail_run calls the error factory before it returns: the loop's policy is still this worker's.
                if rss > policy.memory_mb * MiB:
                    worker.fail_run(
                        lambda out, err: outcome.memory_exceeded(
                            policy.memory_mb,  # noqa: B023
                            "seen by the supervisor's RSS watchdog",
                            stdout=out,
                            stderr=err,
                        )
                    )
                elif cpu - baseline > policy.cpu_time_s:
                    worker.fail_run(
                        lambda out, err: outcome.cpu_exceeded(policy, stdout=out, stderr=err)  # noqa: B023
                    )
            for worker in [w for w in processes if w.state is State.DEAD]:
                del processes[worker]
            idle_cpu.sample(self._open_pool.workers)
            if self._idle_timeout_s is not None:
                self._open_pool.retire_idle_since(now - self._idle_timeout_s)


def tenant_policies(policy: Policy | None, tenants: Mapping[str, Policy] | None) -> dict[str, Policy]:
    """Every tenant's policy, the default tenant's included, as ``Sandbox(policy, tenants=...)`` takes them."""
    policies = dict(tenants or {})
    if policy is not None and DEFAULT_TENANT in policies:
        raise SandboxError("pass the default tenant's policy either as policy= or as tenants['default'], not both")
    if policy is not None or DEFAULT_TENANT not in policies:
        policies[DEFAULT_TENANT] = policy if policy is not None else Policy()
    for name, value in policies.items():
        if not isinstance(value, Policy):
            raise SandboxError(f"tenant {name!r}: expected a Policy, got {type(value).__name__}")
    return policies


def _default_idle_memory_mb() -> int:
    total_mb = int(psutil.virtual_memory().total) // MiB
    return min(DEFAULT_IDLE_MEMORY_CAP_MB, total_mb // DEFAULT_IDLE_MEMORY_SHARE)


def run_sync(
    code: str,
    inputs: Mapping[str, object] | None = None,
    *,
    policy: Policy | None = None,
    timeout: float | None = None,
    workers: int = 1,
) -> Result:
    """Run one code node from synchronous code, on a private uvloop event loop."""
    import uvloop

    async def main() -> Result:
        async with Sandbox(policy, workers=workers) as sandbox:
            return await sandbox.run(code, inputs, timeout=timeout)

    return uvloop.run(main())
