"""What ``ps`` shows for the processes below the supervisor.

Owns: a process's name (``comm``, set with ``PR_SET_NAME``) and its command
line (``/proc/PID/cmdline``): a role and, once it has one, a tenant, such as
``sandbox-worker tenant=free``.

Must never: write outside the argv block the kernel gave the interpreter, or
put there anything but a role and a tenant's name: every user of the host
can read a command line.

Why by hand rather than the ``setproctitle`` package: the runtime is
stdlib-only, and the Linux part of what that package does is short. The argv
strings sit in one block, whose bounds ``/proc/self/stat`` gives
(``arg_start``, ``arg_end``), and Python keeps copies of its own, so the
block can be overwritten in place. The title goes in NUL-terminated and the
block's last byte is made non-NUL: the kernel's sign that the process
retitled itself, after which ``/proc/PID/cmdline`` stops at the first NUL
(``get_mm_cmdline`` in fs/proc/base.c). What the package adds, moving
``environ`` away to make room for a title longer than argv, is not needed:
the launcher's argv (interpreter, flags, boot line) is longer than any title
here, and a longer one is cut.
"""

from __future__ import annotations

import ctypes

from sandbox.runtime import linux

_COMM_BYTES = 15  # TASK_COMM_LEN less its NUL

_argv_block: tuple[int, int] | None = None  # read once; every fork has it at the same address


def set_title(title: str) -> None:
    """``comm`` becomes the title's first word, the command line the whole title."""
    if not title.isprintable():
        title = "".join(c if c.isprintable() else "?" for c in title)
    try:
        linux.set_name(title.split(" ", 1)[0].encode()[:_COMM_BYTES])
        start, end = _block()
    except OSError:
        return  # a title is for people reading ps, never a reason for a process to fail
    size = end - start
    if size < 2:
        return
    text = title.encode()[: size - 2].decode(errors="ignore").encode()  # never half a character
    ctypes.memmove(start, text + b"\0" * (size - 1 - len(text)) + b" ", size)


def _block() -> tuple[int, int]:
    global _argv_block
    if _argv_block is None:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name before ")" may hold spaces
        # Fields 48 and 49 of proc(5); the list starts at field 3.
        _argv_block = int(fields[45]), int(fields[46])
    return _argv_block
