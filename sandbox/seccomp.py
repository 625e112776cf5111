"""Build the seccomp filter a worker loads as its last confinement step.

Owns: which system calls a worker may make, per policy profile. The filter
is compiled once per profile on the host with libseccomp (through
``pyseccomp``) and shipped to workers as classic-BPF bytes; a worker only
hands those bytes to the kernel (``runtime.linux.load_seccomp_bpf``), so
neither libseccomp nor this module ever runs next to user code.

Must never: allow a call that reaches outside the worker's run. The default
action is to allow, and the rules below deny, with ``EPERM`` so that code
sees an ordinary ``PermissionError`` it can handle:

* creating processes and executing programs (``fork``, ``vfork``, ``clone``
  without ``CLONE_THREAD``, ``execve``, ``execveat``) unless the policy allows
  processes; ``clone3`` always fails with ``ENOSYS`` because its flags live
  in memory seccomp cannot read, and glibc then falls back to ``clone`` for
  threads; ``clone`` with any namespace flag is always denied;
* ptrace and cross-process memory access; mounts, namespaces, bpf, perf,
  userfaultfd, keyrings, io_uring, kernel modules and other host-wide knobs;
* memory outside the memory limit's sight: memfd, System V IPC and POSIX
  message queues;
* sockets of any family but ``AF_UNIX``, and ``bind``/``connect``/``listen``/
  ``accept``, unless the policy allows network. With egress, ``AF_INET`` and
  ``AF_INET6`` stream sockets (datagram too with a ``udp:`` entry) and
  ``connect`` are allowed, and nothing else: no ``AF_NETLINK`` (which could
  talk to nftables), no ``AF_PACKET`` or raw sockets, no ``bind``,
  ``listen`` or ``accept``. The destinations themselves are enforced by the
  nftables rules of the worker's network namespace, not here;
* ``kill`` and ``tgkill`` aimed at any pid above 2. Inside a worker's PID
  namespace pid 1 is its init and pid 2 the worker itself, so this leaves
  exactly "self" (and the init, which ignores signals);
* changing any rlimit, of any process (``setrlimit``, ``prlimit64`` with a
  new limit): limits only ever come from the policy.

Architectures other than the native one are killed outright (libseccomp's
bad-arch action), which closes the i386 ``int 0x80`` and x32 side doors.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

_ALWAYS_DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "process_madvise",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "fanotify_init",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "mknod",
    "mknodat",
    "iopl",
    "ioperm",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "tkill",
    # Memory that neither RLIMIT_DATA nor the RSS watchdog sees: memfd pages
    # written but never mapped, System V shared memory and message queues
    # that outlive their mapping, POSIX message queues. Without a memory
    # cgroup (unprivileged) they would escape memory_mb.
    "memfd_create",
    "memfd_secret",
    "shmget",
    "shmat",
    "shmctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "mq_unlink",
)
_PROCESS_CREATION = ("fork", "vfork", "execve", "execveat")
_NETWORK = ("bind", "connect", "listen", "accept", "accept4")
_SERVER_CALLS = ("bind", "listen", "accept", "accept4")
_SOCKET_TYPE_MASK = 0xF  # the low bits of socket()'s type; the rest are SOCK_NONBLOCK and SOCK_CLOEXEC
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # NEWNS CGROUP UTS IPC USER PID NET TIME
_HIGHEST_OWN_PID = 2


class SeccompUnavailable(Exception):
    """libseccomp is missing or refused to build the filter."""


@functools.cache
def build_filter(
    *, allow_processes: bool, allow_network: bool, pid_namespace: bool, egress: tuple[str, ...] = ()
) -> bytes:
    """Return the BPF program (8 bytes per instruction) for this profile."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # pyseccomp raises OSError when libseccomp.so is absent
        raise SeccompUnavailable(f"libseccomp is not usable: {exc}") from None
    deny = sc.ERRNO(errno.EPERM)
    flt = sc.SyscallFilter(sc.ALLOW)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)

    def rule(action: int, name: str, *args: object) -> None:
        try:
            flt.add_rule(action, name, *args)
        except (OSError, ValueError, RuntimeError):
            pass  # the call does not exist on this architecture

    for name in _ALWAYS_DENIED:
        rule(deny, name)
    rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in _CLONE_NAMESPACES:
        rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    if not allow_processes:
        for name in _PROCESS_CREATION:
            rule(deny, name)
        rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    if pid_namespace and not allow_processes:
        for name in ("kill", "tgkill"):
            rule(deny, name, sc.Arg(0, sc.GT, _HIGHEST_OWN_PID))
    # Limits are set by confinement and never change afterwards: reading them
    # (prlimit64 with no new limit) is all that is left.
    rule(deny, "setrlimit")
    rule(deny, "prlimit64", sc.Arg(2, sc.NE, 0))
    if not allow_network and egress:
        _egress_sockets(rule, sc, egress)
    elif not allow_network:
        rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
        rule(sc.ERRNO(errno.EAFNOSUPPORT), "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
        for name in _NETWORK:
            rule(deny, name)
    return _export(flt)


def _egress_sockets(rule: Callable[..., None], sc: Any, protocols: tuple[str, ...]) -> None:
    """Families AF_UNIX, AF_INET, AF_INET6 only; IP sockets of the allowed types only; connect but no server calls."""
    unsupported = sc.ERRNO(errno.EAFNOSUPPORT)
    allowed_families = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}
    rule(unsupported, "socket", sc.Arg(0, sc.GT, max(allowed_families)))
    for family in set(range(max(allowed_families))) - allowed_families:
        rule(unsupported, "socket", sc.Arg(0, sc.EQ, family))
    allowed_types = {socket.SOCK_STREAM} | ({socket.SOCK_DGRAM} if "udp" in protocols else set())
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind in set(range(_SOCKET_TYPE_MASK + 1)) - allowed_types:
            rule(unsupported, "socket", sc.Arg(0, sc.EQ, family), sc.Arg(1, sc.MASKED_EQ, _SOCKET_TYPE_MASK, kind))
    rule(unsupported, "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    for name in _SERVER_CALLS:
        rule(sc.ERRNO(errno.EPERM), name)


def _export(flt: Any) -> bytes:
    fd = os.memfd_create("seccomp-bpf")
    try:
        with os.fdopen(fd, "w+b", closefd=False) as sink:
            flt.export_bpf(sink)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SeccompUnavailable("libseccomp produced no filter")
    return program
