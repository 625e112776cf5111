"""The zygote's half of egress: fill a worker's own network namespace.

Owns: installing the nftables rules a supervisor rendered into a new network
namespace, then starting the pasta process that carries the allowed
connections out. Both happen in the zygote, before the worker is assigned,
so the rules are in the kernel before the worker exists, let alone runs code.

Why pasta (``passt``): it is user-mode networking, so it needs nothing on the
host's network configuration (no veth, route, NAT rule or sysctl that could
be left behind), works the same as root and unprivileged, and its tap device
lives inside the worker's namespace, where the rules see every packet first.
pasta itself opens ordinary sockets on the supervisor's side, so it can only
ever carry what the rules let through. It runs as a child of the zygote in
the zygote's PID namespace: when the zygote dies (and it dies with the
supervisor), the kernel kills pasta with it.

Must never: let a worker start without its rules (any failure here raises,
and the zygote refuses the spawn), forward a port into the namespace or out
of its loopback (``-t/-u/-T/-U none``), map the gateway to the host's
loopback (``--no-map-gw``), or run anything with more capabilities than
``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN`` over the namespace.
"""

from __future__ import annotations

import os
import select
import signal
from typing import NamedTuple

from sandbox.runtime import linux

_PASTA_READY_TIMEOUT_S = 10.0
LAYER = "egress"


class EgressFailed(OSError):
    """The worker's network namespace could not get its rules or its pasta."""


_MAX_DIAGNOSTIC_BYTES = 4000


class _Pasta(NamedTuple):
    pid: int
    ready: int  # read end of the pipe pasta writes its pid file to once it is set up
    log: int


def install(netns: int, spec: dict) -> int:
    """Start pasta on ``netns`` and load ``spec['nft']`` into it; return pasta's pid.

    Both at once, to halve the wait: nothing can send a packet in the
    namespace before its worker joins it, and that happens only after this
    returns, with the rules loaded and pasta ready.
    """
    pasta = _spawn_pasta(netns, spec)
    try:
        _load_rules(netns, spec["nft_path"], spec["nft"].encode())
    except BaseException:
        _kill(pasta.pid)
        os.close(pasta.ready)
        os.close(pasta.log)
        raise
    try:
        _await_ready(pasta)
    except BaseException:
        _kill(pasta.pid)
        raise
    return pasta.pid


def _load_rules(netns: int, nft_path: str, rules: bytes) -> None:
    rules_r, rules_w = os.pipe2(os.O_CLOEXEC)
    log = _diagnostic_file()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(rules_r, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            _enter_with_capabilities(netns, [linux.CAP_NET_ADMIN])
            os.execv(nft_path, ["nft", "-f", "-"])
        finally:
            os._exit(127)
    os.close(rules_r)
    try:
        os.write(rules_w, rules)  # far below a pipe's buffer
    finally:
        os.close(rules_w)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise EgressFailed(1, f"nft refused the egress rules: {_read_diagnostic(log)}")
    os.close(log)


def _spawn_pasta(netns: int, spec: dict) -> _Pasta:
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    log = _diagnostic_file()
    argv = [
        spec["marker"],
        "--quiet",
        "--foreground",
        "--config-net",
        "--no-map-gw",
        "--no-netns-quit",
        "--no-dhcp",
        "--no-dhcpv6",
        "--no-ra",
        *("-t", "none", "-u", "none", "-T", "none", "-U", "none"),
        *([] if spec["udp"] else ["--no-udp"]),
        # pasta's ICMPv6 handler also answers neighbour discovery, which IPv6 needs.
        *(["--no-icmp"] if not spec["ipv6"] else []),
        *([] if spec["ipv6"] else ["--ipv4-only", "--no-ndp"]),
        # pasta as root would switch to nobody and lose what it needs to join
        # the namespace; it drops every other capability itself.
        *(["--runas", "0"] if os.geteuid() == 0 else []),
        "--netns",
        f"/proc/self/fd/{netns}",
        "--pid",
        f"/proc/self/fd/{ready_w}",
    ]
    pid = os.fork()
    if pid == 0:
        try:
            linux.set_parent_death_signal(signal.SIGKILL)
            # An ignored SIGPIPE (Python's default) survives exec, and pasta
            # refuses to start unless it finds the default disposition.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd, target in ((devnull, 0), (devnull, 1), (log, 2)):
                os.dup2(fd, target)
            os.set_inheritable(netns, True)
            os.set_inheritable(ready_w, True)
            if os.geteuid() != 0:
                linux.keep_capabilities_across_exec([linux.CAP_NET_ADMIN, linux.CAP_SYS_ADMIN])
            os.execv(spec["pasta_path"], argv)
        finally:
            os._exit(127)
    os.close(ready_w)
    return _Pasta(pid, ready_r, log)


def _await_ready(pasta: _Pasta) -> None:
    """Wait until pasta has configured the namespace: it writes its pid file (our pipe) only then."""
    try:
        ready, _, _ = select.select([pasta.ready], [], [], _PASTA_READY_TIMEOUT_S)
        started = bool(ready) and bool(os.read(pasta.ready, 64))
    finally:
        os.close(pasta.ready)
    if not started:
        raise EgressFailed(1, f"pasta did not start: {_read_diagnostic(pasta.log) or 'no message'}")
    os.close(pasta.log)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _enter_with_capabilities(netns: int, caps: list[int]) -> None:
    """In a forked helper: join ``netns``, keeping ``caps`` across the coming exec."""
    linux.set_parent_death_signal(signal.SIGKILL)
    linux.setns(netns, linux.CLONE_NEWNET)
    if os.geteuid() != 0:
        linux.keep_capabilities_across_exec(caps)


def _diagnostic_file() -> int:
    """An anonymous file for a helper's error messages, read only if it fails."""
    return os.open("/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)


def _read_diagnostic(fd: int) -> str:
    try:
        return os.pread(fd, _MAX_DIAGNOSTIC_BYTES, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
