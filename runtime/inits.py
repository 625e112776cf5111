"""Pid 1 of every worker's PID namespace, and the small process that forks them.

Owns: the init forker F, a child of the zygote Z that is a fresh, minimal
interpreter, and the init I that F forks for each (init, worker) pair.
Data flows like this (see ``runtime.zygote`` for the rest of the tree)::

    Z ── "fork" + the pair's init channel ─────────────▶ F
                                                         │ unshare(CLONE_NEWPID)
                                                         │ fork() ──▶ I, pid 1
    Z ◀── I's pidfd + an fd of I's PID namespace ─────── F
    │ setns(that namespace); fork() ──▶ W, pid 2
    └── init channel: "W is forked", later the tenant's name ──▶ I

I reaps orphans (the kernel does it for it: SIGCHLD is ignored) and exits
when W does, which makes the kernel kill every process the run left behind.

Why a separate interpreter: a fork costs in proportion to the memory of the
process forked. Its page tables are copied, every page either side writes
afterwards is copied, and the child unmaps all of it when it exits. Z holds
the whole runtime (about 15 MiB of its own memory), which an init needs none
of. F is ``python -S -I`` with a few stdlib modules (about 5 MiB), so an init
forked from it costs a fraction of one forked from Z (docs/BENCHMARKS.md,
"Inits from a small process"). F lives in Z's PID namespace, of which Z is
pid 1, so F and every init die with Z.

Must never: hold anything of a tenant's (F and I are not confined, and run as
the zygote's user), give I a signal handler (a namespace's init receives from
processes inside it only the signals it handles, so with none, no run can
signal it), or let I hold any fd but its standard streams, its channel and
W's pidfd.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
from typing import NoReturn

from sandbox.runtime import linux, proctitle

_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from sandbox.runtime.inits import main; main(sys.argv[2:])"
_REPLY_TIMEOUT_S = 5.0  # F answers in well under a millisecond; longer means it is stuck
_MAX_MESSAGE = 1024
_MAX_TITLE_BYTES = 256
_WORKER_FORKED = b"w"  # Z's first message to I: W exists, as pid 2 of I's namespace
WORKER_PID_IN_NAMESPACE = 2  # pid 1 is the namespace's init; the worker is forked right after it.


class InitForker:
    """Z's handle on F: start it, ask it for inits, and start it again if it is gone."""

    def __init__(self, package_root: str) -> None:
        self._package_root = package_root
        self._socket: socket.socket | None = self._start()  # boots while the caller goes on

    def fork_init(self, channel: socket.socket) -> tuple[int, int]:
        """A new init whose end of ``channel`` is the other one; returns its
        pidfd and an fd of its PID namespace, both the caller's to close.

        A gone or stuck F is replaced once; raises OSError if that fails too.
        """
        for _attempt in range(2):
            if self._socket is None:
                self._socket = self._start()
            try:
                socket.send_fds(self._socket, [b"fork"], [channel.fileno()])
                message, fds, _, _ = socket.recv_fds(self._socket, _MAX_MESSAGE, 2)
            except OSError:
                message, fds = b"", []
            if message == b"ok" and len(fds) == 2:
                return fds[0], fds[1]
            for fd in fds:
                os.close(fd)
            if message:  # F is fine; the kernel refused
                raise OSError(errno.EAGAIN, f"cannot fork an init: {message.decode(errors='replace')}")
            self._socket.close()
            self._socket = None  # F died or hung; its replacement gets the next try
        raise OSError(
            errno.ECHILD,
            f"the init forker ({sys.executable} -S -I, runtime/inits.py) exited or did not answer, twice; "
            "its errors, if any, are on the supervisor's standard error",
        )

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-S", "-I", "-c", _BOOT, self._package_root, str(theirs.fileno())]
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                os.set_inheritable(theirs.fileno(), True)
                if os.geteuid() != 0:
                    # In a user namespace, exec as a uid other than 0 would drop
                    # the capability that creating PID namespaces needs.
                    linux.keep_capabilities_across_exec([linux.CAP_SYS_ADMIN])
                os.execve(sys.executable, argv, {})
            finally:
                os._exit(127)
        theirs.close()
        ours.settimeout(_REPLY_TIMEOUT_S)
        return ours  # Z reaps F like any child it has no record of


def send_worker_forked(channel: socket.socket) -> None:
    """Tell a new init that its worker exists (Z calls this right after forking W)."""
    channel.send(_WORKER_FORKED)


def send_title(channel: socket.socket, label: str) -> None:
    """Hand a new init its title, once its pair has a tenant (Z calls this at the assignment)."""
    try:
        channel.send(label.encode()[:_MAX_TITLE_BYTES])
    except OSError:
        pass  # the init is gone: the worker is too, and its spawn fails on its own


def main(argv: list[str]) -> None:
    """Entry point of F (argv[0] is its end of the socket to Z)."""
    control = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(control.fileno(), False)
    linux.set_dumpable(False)  # inherited by every init F forks
    proctitle.set_title("sandbox-inits")
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    watched: list[int | socket.socket] = [control, wakeup_r]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if wakeup_r in ready:
            drain_wakeup_pipe(wakeup_r)
            _reap()
        if control not in ready:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 1)
        except OSError:
            message, fds = b"", []
        if not message:
            os._exit(0)  # Z is gone
        reply, made = b"ok", []
        try:
            if len(fds) != 1:
                raise OSError(errno.EINVAL, "a fork request carries exactly the init's channel")
            made = _fork_init(fds[0], own_pidns)
        except OSError as exc:
            reply = (str(exc) or "fork failed").encode()[:_MAX_MESSAGE]
        finally:
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(control, [reply], made)
        except OSError:
            os._exit(0)
        finally:
            for fd in made:
                os.close(fd)


def _fork_init(channel: int, own_pidns: int) -> list[int]:
    """Fork an init into a new PID namespace; its pidfd and an fd of that namespace."""
    linux.unshare(linux.CLONE_NEWPID)
    try:
        pid = os.fork()
        if pid == 0:
            _be_init(channel)
        try:
            # Opened before F reaps anything, so the pid cannot have been reused.
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise
        try:
            return [pidfd, os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)]
        except OSError:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            raise
    finally:
        linux.setns(own_pidns, linux.CLONE_NEWPID)  # F's next child is F's own again


def _be_init(channel_fd: int) -> NoReturn:
    """Pid 1 of a worker's namespace: wait until W is forked, take the title
    Z sends once the pair has a tenant, and exit when W does.

    The channel is read as a bare fd (it is SOCK_SEQPACKET, so each read is
    one message), and W is found as pid 2 of this namespace rather than
    sent as a pidfd: a socket object and ``socket.recv_fds`` cost a process
    just forked dozens more copied pages (docs/BENCHMARKS.md). Pid 2 can be
    no other process: Z forks W, and only W, into this namespace right after
    the init, and pids are not reused before they wrap around. If W is
    already gone, ``pidfd_open`` fails and the init exits, as it would have.
    """
    try:
        # SIGCHLD ignored, not handled: the kernel reaps each orphan the
        # moment it dies, so a run's killed leftovers vanish at once, and
        # init keeps no handler a process of its namespace could signal it with.
        linux.reset_signal_state(defaults=(signal.SIGINT, signal.SIGTERM), ignored=(signal.SIGCHLD,))
        os.closerange(3, channel_fd)
        os.closerange(channel_fd + 1, linux.FD_CEILING)
        proctitle.set_title("sandbox-init standby")
        if os.read(channel_fd, _MAX_MESSAGE) != _WORKER_FORKED:
            os._exit(0)  # Z is gone, or gave up on this pair before forking W
        worker = os.pidfd_open(WORKER_PID_IN_NAMESPACE)
        watched = [worker, channel_fd]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if worker in ready:
                os._exit(0)
            label = os.read(channel_fd, _MAX_TITLE_BYTES).decode(errors="replace")
            if label:
                proctitle.set_title(f"sandbox-init {label}")
            watched.remove(channel_fd)  # one title, or none if Z went away
    finally:
        os._exit(0)


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def drain_wakeup_pipe(fd: int) -> None:
    """Empty a non-blocking signal wakeup pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
