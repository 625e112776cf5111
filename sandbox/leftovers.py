"""What supervisors that died without closing left on the host, and its removal.

Owns: this process's owner tag (the part of a host entry's name that ties it
to the supervisor process that made it), the lock that says whether that
process still lives, the kinds of leftovers (each module that makes host
entries registers how to find and remove its own), and ``sweep()``, which
removes every kind's entries of owners that are gone. A ``Sandbox`` sweeps
when it starts.

Must never: remove an entry whose owner lives; judge an entry it cannot tie
to an owner's lock (one made by an older version, or by another user); or
follow a symlink.

Why a lock and not the owner's pid (even with its start time): a pid names a
process only inside one PID namespace. Supervisors run in containers and
under ``unshare --pid``, where their pid names another process out here, or
none; judged by pid, a live supervisor would lose its cgroups to a stranger's
sweep. An exclusive ``flock`` on a file needs no pid: the kernel releases it
when the last process holding the file open exits, however it exits, and a
recycled pid or tag can never hold it on the dead owner's behalf. So each
supervisor process takes ``<tmp>/sandbox-owner-<tag>.lock`` once and holds it
until it exits; an owner is dead when its lock file exists, is ours, and can
be locked. The sweep keeps that lock while it removes, so two sweeps never
work on the same owner, and deletes the lock file last, once every kind
reports nothing of that owner left (a cgroup the kernel still holds is
retried at the next start).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable

from sandbox.errors import SandboxError

# Where owner locks and worker scratch directories live. Not $TMPDIR: every
# supervisor must look in the same place whatever its environment, and a
# worker's uid must be able to reach its scratch directory (a private TMPDIR
# often is not). The zygote gets it in its config.
HOST_TMP = "/tmp"
_TAG_CHARS = 8  # hex digits: short enough for a network interface name's 15 bytes
_LOCK = re.compile(rf"sandbox-owner-(?P<owner>[0-9a-f]{{{_TAG_CHARS}}})\.lock")

# A kind of leftover: given the tags of dead owners, remove its entries that
# carry one of them; True when none is left.
Remover = Callable[[frozenset[str]], bool]
_KINDS: dict[str, Remover] = {}


class _Owner:
    """This process's tag and the open, locked file that says it lives."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.tag = secrets.token_hex(_TAG_CHARS // 2)
        final = lock_path(self.tag)
        # Locked before it gets its name, so no sweep ever sees it unlocked.
        pending = os.path.join(HOST_TMP, f".sandbox-owner-{self.tag}.pending")
        try:
            self.fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SandboxError(
                f"cannot create {pending}: {exc.strerror}; a sandbox needs {HOST_TMP} writable "
                "for its owner lock and its workers' scratch directories"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.write(self.fd, f"{self.pid}\n".encode())  # for people reading /tmp; never trusted
            os.rename(pending, final)
        except BaseException:
            os.close(self.fd)
            os.unlink(pending)
            raise


_owner: _Owner | None = None
_owner_lock = threading.Lock()  # Sandboxes may start in several threads at once


def owner_tag() -> str:
    """This process's owner tag, for the names of the host entries it makes."""
    global _owner
    with _owner_lock:
        if _owner is None or _owner.pid != os.getpid():
            _owner = _Owner()
        return _owner.tag


def _forget_owner_after_fork() -> None:
    # A forked child shares the parent's lock; its own entries get a tag of their own.
    global _owner
    if _owner is not None:
        os.close(_owner.fd)
        _owner = None


os.register_at_fork(after_in_child=_forget_owner_after_fork)


def owner_in(name: str, prefix: str) -> str | None:
    """The owner tag in an entry named ``<prefix><number>-<tag>-<anything>``, or None."""
    match = re.fullmatch(rf"{re.escape(prefix)}[0-9]+-([0-9a-f]{{{_TAG_CHARS}}})-.*", name, re.DOTALL)
    return match[1] if match else None


def register(kind: str, remove: Remover) -> None:
    """Have ``sweep`` remove this kind of leftover too (once per kind; a later call replaces it)."""
    _KINDS[kind] = remove


def sweep() -> None:
    """Remove what dead supervisors left, kind by kind, then their lock files."""
    dead = _lock_dead_owners()
    try:
        if not dead:
            return
        owners = frozenset(dead)
        # Every kind runs, even after one fails to remove everything.
        complete = all([_remove_kind(remove, owners) for remove in _KINDS.values()])
        if complete:
            for owner in dead:
                try:
                    os.unlink(lock_path(owner))
                except FileNotFoundError:
                    pass
    finally:
        for fd in dead.values():
            os.close(fd)


def _remove_kind(remove: Remover, owners: frozenset[str]) -> bool:
    try:
        return remove(owners)
    except OSError:
        return False  # cleaning up must never stop a Sandbox from starting; the next start retries


def _lock_dead_owners() -> dict[str, int]:
    """Tag -> locked fd, for every lock file of ours that no live process holds."""
    dead: dict[str, int] = {}
    try:
        names = os.listdir(HOST_TMP)
    except OSError:
        return dead
    for name in names:
        match = _LOCK.fullmatch(name)
        if match is None:
            continue
        try:
            fd = os.open(os.path.join(HOST_TMP, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                dead[match["owner"]] = fd
                continue
        except OSError:
            pass  # held: its owner lives (or another sweep is at it)
        os.close(fd)
    return dead


def lock_path(owner: str) -> str:
    """The file whose lock says that ``owner`` lives."""
    return os.path.join(HOST_TMP, f"sandbox-owner-{owner}.lock")
