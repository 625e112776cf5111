"""The supervisor's small reads of kernel files: /proc and cgroup files.

Owns: the few figures parsed from such files (a process's CPU time, a
pidfd's pid, a list of pids), each read whole with one ``open``, one
``read`` and one ``close`` (``runtime.linux.read_file``, shared with the
zygote and its workers).

Why not ``open()``: these reads happen on the event loop, per worker start
or per watchdog tick, and a buffered text file costs several more system
calls and allocations for a file the kernel hands over in one read.

Must never: follow a path a worker named, or block: every file here is a
kernel-generated one of the supervisor's own choosing.
"""

from __future__ import annotations

import os

from sandbox.runtime.linux import read_file

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def read_pids(path: str) -> list[int]:
    """The pids listed in ``path`` (``cgroup.procs``, ``/proc/PID/task/TID/children``); raises OSError, ValueError."""
    return [int(pid) for pid in read_file(path, 65536).split()]


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of every thread of process ``pid``, from
    /proc/PID/stat; None if it is gone or unreadable. (psutil reads the same
    file for twice the time.)"""
    try:
        data = read_file(f"/proc/{pid}/stat")
        fields = data[data.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def pidfd_pid(pidfd: int) -> int:
    """The pid of a pidfd's process in our own PID namespace; 0 if the kernel does not say."""
    for line in read_file(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    return 0
