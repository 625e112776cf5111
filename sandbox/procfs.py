"""The supervisor's small reads of kernel files: /proc and cgroup files.

Owns: reading one such file whole with one ``open``, one ``read`` and one
``close``, and the few figures parsed from them (a process's CPU time, a
pidfd's pid, a list of pids).

Why not ``open()``: these reads happen on the event loop, per worker start
or per watchdog tick, and a buffered text file costs several more system
calls and allocations for a file the kernel hands over in one read.

Must never: follow a path a worker named, or block: every file here is a
kernel-generated one of the supervisor's own choosing.
"""

from __future__ import annotations

import os

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def read_bytes(path: str, limit: int = 4096) -> bytes:
    """Up to ``limit`` bytes of ``path``; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_pids(path: str) -> list[int]:
    """The pids listed in ``path`` (``cgroup.procs``, ``/proc/PID/task/TID/children``); raises OSError, ValueError."""
    return [int(pid) for pid in read_bytes(path, 65536).split()]


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of every thread of process ``pid``, from
    /proc/PID/stat; None if it is gone or unreadable. (psutil reads the same
    file for twice the time.)"""
    try:
        data = read_bytes(f"/proc/{pid}/stat")
        fields = data[data.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def pidfd_pid(pidfd: int) -> int:
    """The pid of a pidfd's process in our own PID namespace; 0 if the kernel does not say."""
    for line in read_bytes(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    return 0
