"""Thin ctypes bindings for the Linux calls that confinement needs.

Owns: unshare, setns, mount, pivot_root, prctl, capability dropping,
landlock, loading a prebuilt seccomp BPF program, setting signal
dispositions and the signal mask in a process just forked, and writing or
reading a small file (a /proc or cgroup setting) in one call.

Must never: decide policy. Every function here does exactly one system call
(or a fixed short sequence of them) and raises ``OSError`` on failure, so the
callers in ``runtime.confine`` can fail closed with a clear reason.

Python 3.11 has no ``os.unshare``/``os.setns`` and no binding at all for
mount, pivot_root, capset or landlock, hence ctypes. Building the seccomp
program is left to libseccomp on the host side (``sandbox.seccomp``); here we
only hand the finished bytes to the kernel, which is one prctl.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C half of signal, for reset_signal_state
import ctypes
import os
import platform
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
# Above any fd a process of the pool holds or a policy lets a run open (RLIMIT_NOFILE):
# os.closerange() up to it is one close_range() call.
FD_CEILING = 1 << 20

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_SYSCALLS = {
    # name: (x86_64, aarch64); landlock numbers are the same everywhere.
    "pivot_root": (155, 41),
    "capset": (126, 91),
    "capget": (125, 90),
}
_ARCH_INDEX = {"x86_64": 0, "aarch64": 1}.get(platform.machine())


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall_number(name: str) -> int:
    if _ARCH_INDEX is None:
        raise OSError(38, f"{name}: unsupported architecture {platform.machine()}")
    return _SYSCALLS[name][_ARCH_INDEX]


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(_encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags), _encode(data)),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_syscall_number("pivot_root"), new_root.encode(), put_old.encode()), "pivot_root")


def _prototype(name: str, *argtypes: type) -> Any:
    """A libc function of its own, whose arguments ctypes converts in C.

    Declared once, at import: wrapping each argument in a ctypes object per
    call (``ctypes.c_ulong(x)``) touches so many objects of the zygote that
    a worker's 41 prctl calls dropping its bounding set copied about 90
    more pages than with the prototype (docs/BENCHMARKS.md).
    """
    function = _libc[name]  # indexing, unlike attribute access, makes a new object
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_prctl = _prototype("prctl", ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl_with_string = _prototype("prctl", ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result: int = _prctl(option, arg2, arg3, arg4, arg5)
    # The message is built only on failure: even a small string is an
    # allocation, a write to a page a forked child may still share.
    return result if result >= 0 else _check(result, f"prctl({option})")


def set_parent_death_signal(signum: int) -> None:
    prctl(PR_SET_PDEATHSIG, signum)


def set_name(name: bytes) -> None:
    """The process's ``comm``; the kernel keeps its first 15 bytes.

    The bytes go to the kernel as they are (a bytes object ends in a NUL),
    not through ``ctypes.create_string_buffer``: that makes an array type
    per length, which in a process just forked copied about 50 more pages
    of its parent per call (docs/BENCHMARKS.md).
    """
    _check(_prctl_with_string(PR_SET_NAME, name, 0, 0, 0), "prctl(PR_SET_NAME)")


def reset_signal_state(defaults: tuple[int, ...], ignored: tuple[int, ...] = ()) -> None:
    """Set these signals to their default disposition, those to ignored,
    unblock every signal and drop the wakeup fd, in a process just forked.

    Through ``_signal``, not ``signal``: the Python wrappers turn every
    argument and result into an enum, and touching those enum objects in a
    child copies a page of its parent per object (each copy-on-write fault
    costs about 3 us here; docs/BENCHMARKS.md).
    """
    _signal.set_wakeup_fd(-1)
    for signum in defaults:
        _signal.signal(signum, _signal.SIG_DFL)
    for signum in ignored:
        _signal.signal(signum, _signal.SIG_IGN)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def write_file(path: str, data: bytes, *, create: bool = False) -> None:
    """Write ``data`` to ``path`` with one write(), creating the file if asked.

    For kernel settings (``oom_score_adj``, ``cgroup.procs``, a cgroup's
    limits), which take their value in one write, and the few small files a
    worker makes for itself. Not ``open()``: a text file object costs a
    process just forked dozens of copied pages (docs/BENCHMARKS.md).
    """
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
    fd = os.open(path, flags, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: str, limit: int = 4096) -> bytes:
    """At most ``limit`` bytes of ``path``, with one read(): for the small
    files the kernel generates whole (``memory.events``), as ``write_file``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def set_dumpable(dumpable: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(dumpable))


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Empty the bounding and ambient sets, so that no later execve (when a
    policy allows processes) can gain a capability, even as uid 0 of a user
    namespace or through a file capability. The current sets are untouched."""
    for cap in range(int(read_file("/proc/sys/kernel/cap_last_cap")) + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of this process."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.syscall(_syscall_number("capset"), ctypes.byref(header), ctypes.byref(data)), "capset")


def keep_capabilities_across_exec(caps: list[int]) -> None:
    """Raise ``caps`` (already permitted) into the inheritable and ambient sets,
    so that the next execve keeps them although this uid is not 0: how a
    zygote in a user namespace hands a helper program exactly the
    capabilities it needs over the namespaces the zygote owns."""
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_syscall_number("capget"), ctypes.byref(header), ctypes.byref(data)), "capget")
    for cap in caps:
        data[cap // 32].inheritable |= 1 << (cap % 32)
    _check(_libc.syscall(_syscall_number("capset"), ctypes.byref(header), ctypes.byref(data)), "capset")
    for cap in caps:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp_bpf(program: bytes) -> None:
    """Install a classic-BPF seccomp program (8 bytes per instruction)."""
    if not program or len(program) % 8:
        raise OSError(22, "seccomp: malformed BPF program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


# --- landlock -------------------------------------------------------------

_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_ADD_RULE = 445
_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

LANDLOCK_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
_LANDLOCK_WRITE_V1 = (1 << 1) | sum(1 << b for b in range(4, 13))  # write_file, remove_*, make_*
_LANDLOCK_REFER = 1 << 13  # ABI 2
_LANDLOCK_TRUNCATE = 1 << 14  # ABI 3
_LANDLOCK_IOCTL_DEV = 1 << 15  # ABI 5
_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_LANDLOCK_SCOPE_SIGNAL = 1 << 1  # ABI 6
# Rights that make sense on a file (not a directory) for landlock_add_rule.
_FILE_ACCESS = (1 << 0) | (1 << 1) | (1 << 2) | _LANDLOCK_TRUNCATE | _LANDLOCK_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's landlock ABI version, or 0 when landlock is unavailable."""
    result = _libc.syscall(
        _LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    )
    return max(result, 0)


def landlock_restrict(read_paths: list[str], write_paths: list[str]) -> int:
    """Restrict this process to reading ``read_paths`` and writing ``write_paths``.

    On ABI 6 and later it also scopes signals and abstract unix sockets to
    this landlock domain, so a worker can neither signal nor connect to
    anything outside its own run. Returns the ABI used. Requires
    no_new_privs (or CAP_SYS_ADMIN) to be set first.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(95, "landlock: not supported by this kernel")
    write = _LANDLOCK_WRITE_V1
    if abi >= 2:
        write |= _LANDLOCK_REFER
    if abi >= 3:
        write |= _LANDLOCK_TRUNCATE
    handled = LANDLOCK_READ | write | (_LANDLOCK_IOCTL_DEV if abi >= 5 else 0)
    scoped = (_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | _LANDLOCK_SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(handled, 0, scoped)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 8
    ruleset = _check(
        _libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for paths, access in ((read_paths, LANDLOCK_READ), (write_paths, LANDLOCK_READ | write)):
            for path in paths:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    allowed = access & handled
                    if not os.path.isdir(path):
                        allowed &= _FILE_ACCESS
                    rule = _PathBeneath(allowed, fd)
                    _check(
                        _libc.syscall(
                            _LANDLOCK_ADD_RULE,
                            ctypes.c_int(ruleset),
                            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                            ctypes.byref(rule),
                            ctypes.c_uint32(0),
                        ),
                        f"landlock_add_rule {path}",
                    )
                finally:
                    os.close(fd)
        _check(
            _libc.syscall(_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self"
        )
    finally:
        os.close(ruleset)
    return abi
