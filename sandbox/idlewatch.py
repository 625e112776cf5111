"""Workers that use CPU while they have no run, and their end.

Owns: sampling the CPU time of workers in ``State.IDLE`` (warm ones in the
pool and sessions' workers between runs), a few per watchdog tick, and
ending any that used more than ``IDLE_CPU_ALLOWANCE_S`` in one idle period,
or that has a process besides itself.

Why the host must look: a worker between runs should be asleep, waiting for
its next request (after at most a 200 µs look for it, ``runtime.wire``).
But everything in a worker shares a process with the code its runs left
behind, which can rewrite any of it: a signal handler on an interval timer,
an ``os.write`` that spins once the reply is out, a replaced poll object.
Such a worker looks idle to the pool and burns a CPU that other tenants'
runs need, for as long as its RLIMIT_CPU lasts (twice a run's budget and a
second), while no run, and so no wall-clock or CPU watchdog, is charged
for it. Nothing inside the worker can be trusted to stop that; the kernel's
count of the process's CPU time can.

The baseline of an idle period is its first sample, not the CPU time the
worker's last reply reported: that figure is the worker's word, and it is
taken before the reply is encoded and written, which costs honest CPU in
proportion to the reply's size. A worker that burns from its reply on
gets, on top of the allowance, the time until its first sample: one tick
(50 ms) while at most ``_SAMPLED_PER_TICK`` workers are idle. Where /proc
cannot be read (a ``hidepid`` mount), nothing is sampled, as for the
watchdog's RSS and CPU samples of busy workers.

Processes are the other half. A worker whose policy allows them kills
every process of its PID namespace after each run and waits until they are
gone, before it replies; but that code too can be undone by the run, and a
process the run left behind spins in the worker's namespace, where the
worker's own CPU time does not count it. Such processes stay in the
worker's pids cgroup wherever they are reparented, so where the worker has
one (``WorkerProcess.processes_file``), any process listed there but the
worker itself ends the worker at once, whatever it uses. Without a cgroup
(unprivileged), the namespace tells the same: a process the run left is a
child of one of the worker's threads, or, orphaned, of the namespace's
init, which otherwise has no child at all (the worker is the zygote's
child): ``/proc/PID/task/TID/children``.

Must never: end a worker that is starting or running (those are the
watchdog's and the wall-clock timer's), or read more than
``_SAMPLED_PER_TICK`` workers' CPU times per tick however many are idle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from sandbox import procfs
from sandbox.worker import State, WorkerProcess

# CPU a worker may use in one idle period: its look for the next request
# takes at most 0.2 ms, and /proc counts in clock ticks of 10 ms.
IDLE_CPU_ALLOWANCE_S = 0.1
# About 9 us each: 0.15 ms of the loop per tick. 256 idle workers (the
# default max_idle_workers) are all seen every 16 ticks, 0.8 s.
_SAMPLED_PER_TICK = 16


class IdleCpuWatch:
    """The supervisor's watchdog calls ``sample`` once per tick with every worker of the pool."""

    def __init__(self) -> None:
        # Per worker: (its completed runs when the idle period began, its CPU seconds at the period's first sample).
        self._baselines: dict[WorkerProcess, tuple[int, float]] = {}
        self._last_id = 0  # the highest worker id sampled last tick; the next tick goes on after it

    def sample(self, workers: Iterable[WorkerProcess]) -> None:
        """Sample the next few idle workers, in the order of their ids, and end those over the allowance."""
        idle = sorted((w for w in workers if w.state is State.IDLE), key=lambda w: w.id)
        for gone in [w for w in self._baselines if w.state is State.DEAD]:
            del self._baselines[gone]
        if not idle:
            return
        later = [w for w in idle if w.id > self._last_id]
        batch = (later + idle[: len(idle) - len(later)])[:_SAMPLED_PER_TICK]
        self._last_id = batch[-1].id
        for worker in batch:
            if _has_other_processes(worker):
                worker.end_idle(
                    "a process its last run started was still there after the run, which the worker's own "
                    "clean-up should have made impossible; processes never outlive their run"
                )
                continue
            used = procfs.process_cpu_seconds(worker.pid)
            if used is None:
                continue
            period = self._baselines.get(worker)
            if period is None or period[0] != worker.runs:  # the first sample of a new idle period
                self._baselines[worker] = (worker.runs, used)
                continue
            baseline = period[1]
            if used - baseline > IDLE_CPU_ALLOWANCE_S:
                worker.end_idle(
                    f"it used {used - baseline:.2f} s of CPU while it had no run, over the "
                    f"{IDLE_CPU_ALLOWANCE_S:g} s a worker may use between runs; something the last run "
                    "left behind (a timer's signal handler, a patched function) kept running"
                )


def _has_other_processes(worker: WorkerProcess) -> bool:
    """Whether a process besides the worker (and its init) is left in its cgroup
    or its PID namespace; False where neither can tell."""
    try:
        if worker.processes_file is not None:
            return any(pid != worker.pid for pid in procfs.read_pids(worker.processes_file))
        if worker.init_pid:
            init = worker.init_pid
            if procfs.read_pids(f"/proc/{init}/task/{init}/children"):
                return True
            threads = os.listdir(f"/proc/{worker.pid}/task")
            return any(procfs.read_pids(f"/proc/{worker.pid}/task/{tid}/children") for tid in threads)
    except (OSError, ValueError):
        pass
    return False
