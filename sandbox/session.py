"""A stateful session: several runs sharing one namespace in one worker.

Owns: ``Session``, what ``Sandbox.session()`` returns: the order of its
runs (one at a time, in the order they were submitted), its idle and
lifetime limits (``session_idle_s``, ``session_max_s``), and how it ends:
once its worker is gone, every later call raises the error that says why
(``SessionLost``, or ``SandboxClosed`` when the Sandbox was closed).

Must never: ship its state anywhere, or share its worker. The state lives
in the session's own worker process for the session's life and nowhere
else; the worker is started for the session, never handed to another run
or session, and retired (killed) when the session ends, however it ends.
A run that ends that worker raises its usual error; the session is over.

What a session keeps between runs: its variables (one namespace; inputs
are bound into it before each run), the files in its scratch space (cwd,
/tmp, /dev/shm) and the files its code left open. What it does not keep:
processes (killed after every run), tasks (cancelled), the working
directory (each run starts in /work) and threads (a run that leaves one
running makes its worker unfit for another run, and ends the session).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sandbox.errors import SandboxError, SessionLost
from sandbox.job import Job, OutputObserver
from sandbox.result import Result
from sandbox.stream import RunStream
from sandbox.worker import WorkerProcess

if TYPE_CHECKING:
    from sandbox.supervisor import Sandbox


class Session:
    """Runs that share state, in one worker of their own.

    ``async with sb.session(tenant="default") as s:`` opens it (or raises
    ``QuotaExceeded`` naming the limit that stopped it); ``s.run(...)`` and
    ``s.stream(...)`` work as on the Sandbox, except that names bound by
    earlier runs stay visible and ``Result.outputs`` holds only what this
    run bound or rebound. Leaving the ``async with`` block ends it.
    """

    def __init__(self, sandbox: Sandbox, tenant: str) -> None:
        self.tenant = tenant
        self._sandbox = sandbox
        self._worker: WorkerProcess | None = None
        self._turn = asyncio.Lock()  # FIFO: runs go one at a time in submission order
        self._submitted = 0
        self._waiting = 0  # runs submitted and not finished
        self._job: Job | None = None
        self._job_number = 0
        self._ended: SandboxError | None = None
        self._ended_by_run: int | None = None  # set while the reason can still be made precise
        self._idle_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._worker is not None or self._ended is not None:
            raise SandboxError("a session can be opened only once; call Sandbox.session() for another")
        self._worker = await self._sandbox._open_session(self)
        policy = self._worker.profile.policy
        loop = asyncio.get_running_loop()
        self._life_timer = loop.call_later(policy.session_max_s, self._lifetime_over, policy.session_max_s)
        self._restart_idle_timer()

    async def close(self) -> None:
        """End the session and retire its worker; a run still in flight ends with SessionLost."""
        self._end(SessionLost("this session was closed; open a new one with Sandbox.session()"))

    @property
    def ended(self) -> SandboxError | None:
        """Why the session is over (the error every later call raises), or None while it goes on."""
        return self._ended

    # --- runs ---------------------------------------------------------------------

    async def run(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        filename: str = "<code>",
        files: Mapping[str, bytes] | None = None,
    ) -> Result:
        """Run ``code`` in the session's namespace, after the runs submitted before it.

        ``files`` are written as for ``Sandbox.run``, replacing files of the
        same name; ./out/ keeps what earlier runs left there, so each
        ``Result.files`` holds all of it."""
        return await self._run(code, inputs, timeout, filename, None, files)

    def stream(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        filename: str = "<code>",
        files: Mapping[str, bytes] | None = None,
    ) -> RunStream:
        """``run`` with its output delivered as written (see ``Sandbox.stream``); submitted when the loop starts.

        Leaving the loop early cancels the run, which kills the session's
        worker and so ends the session.
        """
        return RunStream(lambda observer: self._run(code, inputs, timeout, filename, observer, files))

    async def _run(
        self,
        code: str,
        inputs: Mapping[str, object] | None,
        timeout: float | None,
        filename: str,
        observer: OutputObserver | None,
        files: Mapping[str, bytes] | None = None,
    ) -> Result:
        self._raise_if_over()
        queued = self._waiting - (1 if self._job is not None else 0)  # the run in flight is not waiting
        self._sandbox._scheduler.admit_elsewhere(self.tenant, queued)
        self._submitted += 1
        number = self._submitted
        self._waiting += 1
        self._stop_idle_timer()
        try:
            async with self._turn:
                self._raise_if_over()
                worker = self._worker
                assert worker is not None
                profile, job = self._sandbox._new_job(
                    code, inputs, self.tenant, timeout, True, filename, observer, files
                )
                self._job, self._job_number = job, number
                try:
                    return await self._sandbox._run_dedicated(worker, profile, job)
                except SandboxError as exc:
                    if self._ended_by_run == number:  # this run's error is why the session is over
                        self._ended = _lost(
                            f"run {number} ended the session: {type(exc).__name__}: {exc.message}", number
                        )
                    raise
                except asyncio.CancelledError:
                    if self._ended_by_run == number:
                        self._ended = _lost(f"run {number} was cancelled, which killed the session's worker", number)
                    raise
                finally:
                    self._job = None
        finally:
            self._waiting -= 1
            self._restart_idle_timer()

    def _raise_if_over(self) -> None:
        if self._ended is not None:
            raise self._ended
        if self._worker is None:
            raise SandboxError("the session is not open (use it as 'async with sb.session() as s')")

    # --- how it ends ----------------------------------------------------------------

    def _end(self, reason: SandboxError) -> None:
        """End the session: later calls raise ``reason``; a run in flight fails with it. Idempotent."""
        if self._ended is None:
            self._ended, self._ended_by_run = reason, None
        self._stop_idle_timer()
        if self._life_timer is not None:
            self._life_timer.cancel()
            self._life_timer = None
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._job is not None:
            message, kind = self._ended.message, type(self._ended)
            worker.fail_run(lambda out, err: kind(message, stdout=out, stderr=err))
        self._sandbox._close_session(self, worker)

    def _lifetime_over(self, limit_s: float) -> None:
        self._life_timer = None
        self._end(_lost(f"the session reached its lifetime limit of {limit_s:g} s (session_max_s) and was ended"))

    def _idle_over(self, limit_s: float) -> None:
        self._idle_timer = None
        if self._waiting == 0:
            self._end(_lost(f"the session was idle for {limit_s:g} s (session_idle_s) and was ended"))

    def _restart_idle_timer(self) -> None:
        self._stop_idle_timer()
        if self._worker is not None and self._ended is None and self._waiting == 0:
            limit = self._worker.profile.policy.session_idle_s
            self._idle_timer = asyncio.get_running_loop().call_later(limit, self._idle_over, limit)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    # --- the worker's listener (through the pool) --------------------------------------

    def worker_released(self, worker: WorkerProcess, *, retire: bool) -> None:
        if retire and self._ended is None:
            number = self._job_number
            self._end_by_run(
                f"after run {number} the session's worker could not be used again (the run left a thread "
                "running, replaced its standard streams, ran out of memory or used up the CPU time of the "
                "session's life)",
                number,
            )

    def _end_by_run(self, message: str, number: int) -> None:
        """End the session because of run ``number``, whose error (if any) will refine ``message``."""
        self._end(_lost(message, number))
        self._ended_by_run = number

    def worker_lost(self, worker: WorkerProcess) -> None:
        if self._ended is None:
            job = self._job
            if job is not None and worker.job is job:
                # The run's error is not always known yet (a dying process is
                # explained by its exit report); the run itself refines this.
                self._end_by_run(f"run {self._job_number} ended the session's worker", self._job_number)
            else:
                after = f"after run {self._job_number}" if self._job_number else "before its first run"
                why = f": {worker.end_reason}" if worker.end_reason else ""
                self._end(_lost(f"the session's worker ended between runs ({after}){why}", self._job_number or None))


def _lost(message: str, run: int | None = None) -> SessionLost:
    return SessionLost(f"{message}; its state is gone, open a new session", run=run)
