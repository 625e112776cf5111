"""The template process that forks every worker.

Owns: the process tree below the supervisor. Data flows like this::

    supervisor (sandbox.zygote.Zygote)
      │ SOCK_SEQPACKET control socket: spawn requests + fds in, events out
      ▼
    launcher  L   the supervisor's direct child. Enters a user namespace when
      │           unprivileged, creates a PID namespace, forks Z and waits.
      ▼
    zygote    Z   pid 1 of that namespace. Has imported the whole runtime once,
      │           so a worker costs a fork, not an interpreter start.
      ├── init forker F  a small interpreter of its own (``runtime.inits``):
      │   │              forking an init from it costs far less than from Z.
      │   └── init I     pid 1 of a fresh PID namespace per worker: reaps
      │                  orphans and exits when the worker does, which makes
      │                  the kernel kill every process the run left behind.
      └── worker W pid 2 of that namespace: Z joins I's namespace and forks
                  W right after F has forked I. W confines itself
                  (``runtime.confine``) and serves runs over its own
                  channel (``runtime.worker``).

Z keeps a few (I, W) pairs forked ahead of need ("standbys"): a standby
holds nothing but its assignment socket until a spawn request hands it a
config and the worker's fds, so starting a worker costs confinement only,
not two forks. Z forks replacements while it has nothing else to do.

Z parents W, so it reaps W itself and reports the exact wait status and
rusage. The supervisor gets pidfds for I and W, so it can kill a worker's
whole namespace with one race-free ``pidfd_send_signal``. L, Z and every
worker have ``PR_SET_PDEATHSIG``: if the supervisor dies, L, Z and then all
workers die with it (and F and the inits with Z, their namespace's pid 1).

Must never: run user code, hold another worker's channel after a fork, or
keep a tenant's secrets (environment values go to a worker over its own
channel, never through Z, because every later worker is a copy of Z's memory).
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import json
import os
import pickle
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from sandbox.runtime import confine, egress, inits, linux, proctitle, wire
from sandbox.runtime.files import OUT_DIR

_MAX_CONTROL_MESSAGE = 1 << 20
SCRATCH_PREFIX = "sandbox-w"  # then the worker id, the supervisor's owner tag and mkdtemp's suffix
_CHANNEL_FD, _STDOUT_FD, _STDERR_FD = 3, 1, 2
_group_numbers = itertools.count()  # names of the cgroups this zygote makes (_new_group)


def main(argv: list[str]) -> None:
    """Entry point of the launcher process L (argv[0] is the control socket's fd).

    The config is the first message on that socket, not an argument: every
    user of the host can read a command line.
    """
    linux.set_parent_death_signal(signal.SIGKILL)
    proctitle.set_title("sandbox-launcher")
    control = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(control.fileno(), False)
    config = json.loads(control.recv(_MAX_CONTROL_MESSAGE) or b"null")
    if config is None or os.getppid() != config["supervisor_pid"]:
        os._exit(1)  # the supervisor died before we could tie our life to it
    userns = config.get("userns")
    namespaces: dict[str, bool | str | None] = {"userns": False, "pid_namespaces": False, "namespace_error": None}
    try:
        if userns is not None:
            _enter_user_namespace(userns["uid"], userns["gid"], userns["inside_id"])
            namespaces["userns"] = True
        linux.unshare(linux.CLONE_NEWPID)
        namespaces["pid_namespaces"] = True
    except OSError as exc:
        # Degrade, do not die: the supervisor reports exactly which layers
        # are missing and refuses any policy that requires them.
        namespaces["namespace_error"] = str(exc)
    pid = os.fork()
    if pid == 0:
        _Zygote(control, config, namespaces).serve()
        os._exit(0)
    control.close()
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _enter_user_namespace(uid: int, gid: int, inside_id: int) -> None:
    linux.unshare(linux.CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inside_id} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inside_id} {gid} 1")


class _Standby(NamedTuple):
    """A forked (init, worker) pair waiting for its config, so a spawn costs no fork.

    Its worker has already joined cgroups of its own (moving a task between
    cgroups waits for an RCU grace period, about 10 ms here), held by
    placeholder limits until the assignment writes the tenant's.
    """

    init: int  # pidfd of the init; of the worker itself when it has no PID namespace (it stands in)
    worker_pid: int
    assignment: socket.socket
    cgroups: list[str]
    init_channel: socket.socket | None  # to the init, for its title; None without PID namespaces


class _Zygote:
    def __init__(self, control: socket.socket, config: dict, namespaces: dict) -> None:
        linux.set_parent_death_signal(signal.SIGKILL)
        linux.set_dumpable(False)
        proctitle.set_title("sandbox-zygote")
        self.control = control
        self.pid_namespaces = namespaces["pid_namespaces"]
        # Started first: the small interpreter boots while Z imports the runtime.
        self.inits = inits.InitForker(_package_root()) if self.pid_namespaces else None
        self.interpreter_paths = interpreter_paths()
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.empty_netns, netns_error = _namespace_from_child(lambda: linux.unshare(linux.CLONE_NEWNET), "net")
        self.templates: dict[tuple, tuple[int | None, str | None]] = {}  # paths -> (mnt ns fd, error)
        for name in config["preload"]:
            try:
                __import__(name)
            except Exception:  # a missing optional module must not stop the pool
                pass
        import sandbox.runtime.worker  # noqa: F401  (pre-import everything a worker runs)

        self.scratch_root: str = config["scratch_root"]
        self.owner: str = config["owner"]  # the supervisor's tag, in the names of what we make on the host
        self.workers: dict[int, dict] = {}  # worker pid -> record
        self.stale_cgroups: list[str] = []  # removed once the kernel has released them
        self.stock_size: int = config["standby"]
        self.stock: list[_Standby] = []
        self.standby_cgroups: dict[str, dict[str, int]] | None = config["standby_cgroups"]
        self.wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        gc.freeze()  # keep the imported heap shared copy-on-write with every worker
        self._send({"op": "ready", "netns_error": netns_error, **namespaces})

    def serve(self) -> None:
        while True:
            # Forking standbys is what the zygote does while nobody asks for anything.
            idle_timeout = 0 if len(self.stock) < self.stock_size else (0.5 if self.stale_cgroups else None)
            watched: list[socket.socket | int] = [self.control, self.wakeup_r]
            ready, _, _ = select.select(watched, [], [], idle_timeout)
            if self.wakeup_r in ready:
                inits.drain_wakeup_pipe(self.wakeup_r)
            self._reap()
            if self.control in ready:
                try:
                    message, fds, _, _ = socket.recv_fds(self.control, _MAX_CONTROL_MESSAGE, 8)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # ECONNRESET: the supervisor closed with our events unread
                    message, fds = b"", []
                if not message:
                    self._shut_down()  # the supervisor closed the control socket
                    return
                self._handle(pickle.loads(message), fds)
            elif len(self.stock) < self.stock_size:
                self._restock()
            self.stale_cgroups = [d for d in self.stale_cgroups if not _rmdir(d)]

    def _handle(self, request: dict, fds: list[int]) -> None:
        worker_id = request["worker_id"]
        config = request["config"]
        record = {"id": worker_id, "cgroups": [], "scratch": None, "pasta": None}
        egress_netns = None
        try:
            # A worker whose mount namespace is required never falls back to a
            # directory on the host (confinement fails instead), so it gets none.
            if not config["layers"].get("mountns"):
                record["scratch"] = _make_host_scratch(
                    self.scratch_root,
                    f"{SCRATCH_PREFIX}{worker_id}-{self.owner}-",
                    config.get("uid"),
                    config.get("gid"),
                )
            config.update(
                pid_namespace=self.pid_namespaces,
                host_scratch=record["scratch"],
                readonly_paths=_outermost(self.interpreter_paths),
            )
            template, config["template_error"] = self._template(
                config["readonly_paths"], config["mounts"], config["etc_files"]
            )
            if config.get("egress") is not None:
                egress_netns, record["pasta"] = self._egress_netns(config["egress"])
            namespaces = [fd for fd in (template, egress_netns) if fd is not None]
            standby = self._assign(config, [*fds, *namespaces])
        except OSError as exc:
            layer = egress.LAYER if isinstance(exc, egress.EgressFailed) else None
            self._send({"op": "spawn_failed", "worker_id": worker_id, "reason": str(exc), "layer": layer})
            self._release(record)
            return
        finally:
            for fd in fds:
                os.close(fd)
            if egress_netns is not None:
                os.close(egress_netns)
        record["cgroups"] = standby.cgroups
        self.workers[standby.worker_pid] = record
        pidfds = [standby.init, os.pidfd_open(standby.worker_pid)]
        try:
            self._send({"op": "spawned", "worker_id": worker_id, "cgroups": standby.cgroups}, pidfds)
        finally:
            for fd in pidfds:
                os.close(fd)

    def _template(
        self, readonly_paths: list[str], mounts: list[tuple[str, str, bool]], etc_files: list[str]
    ) -> tuple[int | None, str | None]:
        """The template mount namespace for these paths and mounts, built on first use."""
        key = (tuple(readonly_paths), tuple(map(tuple, mounts)), tuple(etc_files))
        if key not in self.templates:
            self.templates[key] = _namespace_from_child(
                lambda: confine.build_template(readonly_paths, mounts, etc_files), "mnt"
            )
        return self.templates[key]

    def _egress_netns(self, spec: dict) -> tuple[int, int]:
        """A network namespace of the worker's own, with its egress rules loaded
        and pasta attached; its fd and pasta's pid. Raises OSError, never
        returns a namespace without rules."""
        if not self.pid_namespaces:
            raise egress.EgressFailed(95, "egress needs PID namespaces, which keep pasta from outliving the zygote")
        netns, error = _namespace_from_child(lambda: linux.unshare(linux.CLONE_NEWNET), "net")
        if netns is None:
            raise egress.EgressFailed(95, f"cannot create a network namespace: {error}")
        try:
            return netns, egress.install(netns, spec)
        except OSError:
            os.close(netns)
            raise

    def _assign(self, config: dict, fds: list[int]) -> _Standby:
        """Give a config and its fds to a standby pair (fork one if none is left)."""
        while True:
            standby = self.stock.pop() if self.stock else self._fork_standby()
            try:
                config["cgroup_error"] = _set_cgroup_limits(standby.cgroups, config.get("cgroup"))
                socket.send_fds(standby.assignment, [pickle.dumps(config)], fds)
                if standby.init_channel is not None:  # without a PID namespace there is no init to title
                    inits.send_title(standby.init_channel, _tenant_label(config))
                return standby
            except OSError:
                _kill(standby.init)  # it died while waiting; try the next
                os.close(standby.init)
                self.stale_cgroups.extend(standby.cgroups)
                if not self.stock:
                    raise
            finally:
                standby.assignment.close()
                if standby.init_channel is not None:
                    standby.init_channel.close()

    def _restock(self) -> None:
        try:
            self.stock.append(self._fork_standby())
        except OSError:
            pass  # out of processes for now; spawns fork on demand

    def _fork_standby(self) -> _Standby:
        cgroups = _make_cgroups(self.standby_cgroups)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            init, worker_pid, init_channel = self._fork_pair(lambda: self._await_assignment(theirs, cgroups))
        except OSError:
            ours.close()
            self.stale_cgroups.extend(cgroups)
            raise
        finally:
            theirs.close()
        return _Standby(init, worker_pid, ours, cgroups, init_channel)

    def _fork_pair(self, worker_main: Callable[[], None]) -> tuple[int, int, socket.socket | None]:
        """An init (pid 1, forked by F) and the worker (pid 2) in a new PID
        namespace: the init's pidfd, the worker's pid and Z's end of the
        init's channel.

        Without PID namespaces the worker is a plain child and stands in
        for its own init.
        """
        if self.inits is None:
            worker_pid = os.fork()
            if worker_pid == 0:
                worker_main()
            return os.pidfd_open(worker_pid), worker_pid, None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            init, pidns = self.inits.fork_init(theirs)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            linux.setns(pidns, linux.CLONE_NEWPID)
            try:
                worker_pid = os.fork()
                if worker_pid == 0:
                    worker_main()
            finally:
                linux.setns(self.own_pidns, linux.CLONE_NEWPID)
            inits.send_worker_forked(ours)
        except OSError:
            _kill(init)  # and with it the worker, if it was forked
            os.close(init)
            ours.close()
            raise
        finally:
            os.close(pidns)
        return init, worker_pid, ours

    def _await_assignment(self, assignment: socket.socket, cgroups: list[str]) -> None:
        """A standby worker: join its cgroups, then hold nothing but its
        assignment socket until a config arrives."""
        try:
            linux.set_parent_death_signal(signal.SIGKILL)
            proctitle.set_title("sandbox-worker standby")
            confine.reset_signals()
            keep = {0, 1, 2, assignment.fileno()}
            if self.empty_netns is not None:
                keep.add(self.empty_netns)
            _close_fds_except(keep)
            joined = confine.join_cgroups(cgroups)
            message, fds, _, _ = socket.recv_fds(assignment, _MAX_CONTROL_MESSAGE, 5)
            if not message or len(fds) < 3:
                os._exit(0)  # the zygote is gone or dropped us
            assignment.close()
            config = pickle.loads(message)
            config["cgroup_error"] = config["cgroup_error"] or joined
        except BaseException:
            os._exit(72)
        self._become_worker(config, fds)

    def _become_worker(self, config: dict, fds: list[int]) -> None:
        try:
            proctitle.set_title(f"sandbox-worker {_tenant_label(config)}")
            os.setsid()
            # Lift every fd we keep above the low numbers first, so that
            # placing the channel and stdio on 0-3 can never overwrite one.
            channel, stdout, stderr, *template = (_lift(fd) for fd in fds)
            if config.get("egress") is not None:
                netns: int | None = template.pop()  # the worker's own, sent last
            else:
                netns = None if self.empty_netns is None else _lift(self.empty_netns)
            devnull = os.open("/dev/null", os.O_RDONLY)
            for src, dst in ((devnull, 0), (stdout, _STDOUT_FD), (stderr, _STDERR_FD), (channel, _CHANNEL_FD)):
                os.dup2(src, dst)
            namespaces = [fd for fd in (netns, *template) if fd is not None]
            _close_fds_except({0, _STDOUT_FD, _STDERR_FD, _CHANNEL_FD, *namespaces})
            try:
                layers, scratch = confine.confine(config, netns, template[0] if template else None)
            except confine.ConfinementFailed as exc:
                wire.write_all(_CHANNEL_FD, wire.frame(wire.encode_hello({}, str(exc))))
                os._exit(70)
            finally:
                for fd in namespaces:
                    os.close(fd)
            from sandbox.runtime import worker

            worker.serve(_CHANNEL_FD, layers, scratch, config["worker"])
        except BaseException:
            os._exit(71)
        os._exit(0)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            record = self.workers.pop(pid, None)
            if record is None:
                continue
            oom = any(_oom_killed(d) for d in record["cgroups"])
            self._release(record)
            self._send(
                {
                    "op": "exited",
                    "worker_id": record["id"],
                    "status": status,
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "maxrss_kb": usage.ru_maxrss,
                    "oom": oom,
                }
            )

    def _shut_down(self) -> None:
        """Kill every worker and standby, then remove what they owned on the host.

        Only as pid 1 of the namespace holding them all does kill(-1) reach
        exactly them; without PID namespaces each is killed by its pid.
        """
        targets = [-1] if os.getpid() == 1 else [*self.workers, *(s.worker_pid for s in self.stock)]
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
        for record in self.workers.values():
            self._release(record)
        for standby in self.stock:
            self.stale_cgroups.extend(standby.cgroups)
        deadline = time.monotonic() + 1.0
        while self.stale_cgroups and time.monotonic() < deadline:
            self.stale_cgroups = [d for d in self.stale_cgroups if not _rmdir(d)]
            time.sleep(0.01)

    def _release(self, record: dict) -> None:
        # rmtree never follows a symlink, so a worker cannot point it elsewhere.
        if record["scratch"] is not None:
            shutil.rmtree(record["scratch"], ignore_errors=True)
        if record["pasta"] is not None:
            try:
                os.kill(record["pasta"], signal.SIGKILL)  # reaped by _reap like any child
            except ProcessLookupError:
                pass
            record["pasta"] = None
        self.stale_cgroups.extend(record["cgroups"])

    def _send(self, event: dict, fds: Sequence[int] = ()) -> None:
        data = json.dumps(event).encode()
        try:
            socket.send_fds(self.control, [data], list(fds))
        except OSError:  # the supervisor is gone (or closing): clean up, as on EOF
            self._shut_down()
            os._exit(0)


def _tenant_label(config: dict) -> str:
    return f"tenant={config['worker']['tenant']}"


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _package_root() -> str:
    """The directory holding the sandbox package, for interpreters the zygote starts."""
    import sandbox

    return os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__)))


def interpreter_paths() -> list[str]:
    """What a worker must be able to read: the interpreter, its libraries, the runtime."""
    import sandbox

    package_dir = os.path.dirname(os.path.abspath(sandbox.__file__))
    # Resolved: in a checkout, sandbox/runtime is a link to the runtime/ folder.
    runtime_dir = os.path.dirname(os.path.realpath(confine.__file__))
    paths = ["/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, package_dir, runtime_dir]
    # sys.path[0] is the directory holding the sandbox package (maybe a whole
    # checkout); the package itself is enough.
    paths += [p for p in sys.path[1:] if os.path.isdir(p)]
    return [os.path.abspath(p) for p in paths if p and os.path.abspath(p) != "/"]


def _outermost(paths: list[str]) -> list[str]:
    """Drop duplicates and paths inside another listed path."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _make_host_scratch(root: str, prefix: str, uid: int | None, gid: int | None) -> str:
    """A private, empty directory: the scratch space of a worker that has no
    mount namespace of its own. Removed when the worker is reaped, or by the
    next supervisor's sweep if ours died first (``sandbox.leftovers``)."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=root)
    os.mkdir(os.path.join(directory, OUT_DIR), 0o700)
    if uid is not None and gid is not None:
        for path in (directory, os.path.join(directory, OUT_DIR)):
            os.chown(path, uid, gid)
    return directory


def _lift(fd: int) -> int:
    """A copy of ``fd`` numbered 64 or above (the original is closed)."""
    lifted = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(fd)
    return lifted


def _close_fds_except(keep: set[int]) -> None:
    """Close every fd not in ``keep``: one close_range() per gap, no listing of /proc/self/fd.

    An empty gap is skipped: ``os.closerange(0, 0)`` is not a no-op but
    closes every fd (CPython passes close_range() an upper bound of -1, that
    is, the highest fd there is).
    """
    low = 0
    for fd in sorted(keep):
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, linux.FD_CEILING)


def _namespace_from_child(setup: Callable[[], None], kind: str) -> tuple[int | None, str | None]:
    """Run ``setup`` in a short-lived child and keep, by fd, the namespace of
    type ``kind`` ("net", "mnt") it ends up in; or the reason it failed."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)  # setup may leave no /proc in view
            setup()
            fd = os.open(f"self/ns/{kind}", os.O_RDONLY, dir_fd=proc)
            socket.send_fds(child, [b"ok"], [fd])
        except BaseException as exc:
            child.send(str(exc).encode()[:1000] or b"setup failed")
        finally:
            os._exit(0)
    child.close()
    try:
        message, fds, _, _ = socket.recv_fds(parent, 1024, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if message == b"ok" and fds:
        os.set_inheritable(fds[0], False)
        return fds[0], None
    return None, message.decode(errors="replace") or "the helper process died"


def _make_cgroups(placeholders: dict[str, dict[str, int]] | None) -> list[str]:
    """One new group per delegated hierarchy, under placeholder limits; [] if none
    is delegated or one cannot be made (the worker then reports the layer off)."""
    if not placeholders:
        return []
    made: list[str] = []
    try:
        for parent, limits in placeholders.items():
            directory = _new_group(parent)
            made.append(directory)
            _write_limits(directory, limits)
    except OSError:
        for directory in made:
            _rmdir(directory)
        return []
    return made


def _new_group(parent: str) -> str:
    """A new, empty group under ``parent``, named by a counter.

    Not ``tempfile.mkdtemp``: its random names are a few dozen lines of
    Python per start, and only this zygote makes groups under this parent
    (one per Sandbox, ``sandbox.cgroups``), so a counter cannot collide,
    except with a group a crashed zygote of the same Sandbox left, which is
    skipped.
    """
    while True:
        directory = os.path.join(parent, f"w{next(_group_numbers)}")
        try:
            os.mkdir(directory, 0o700)
            return directory
        except FileExistsError:
            continue


def _set_cgroup_limits(directories: list[str], spec: dict | None) -> str | None:
    """Write the tenant's limits into a standby's groups; the reason if that is not possible."""
    if not spec:
        return None
    if not directories:
        return "no cgroup could be made for this worker"
    try:
        for directory in directories:
            _write_limits(directory, spec["hierarchies"][os.path.dirname(directory)])
    except (OSError, KeyError) as exc:
        return f"cannot set cgroup limits: {exc}"
    return None


def _write_limits(directory: str, limits: dict[str, int]) -> None:
    for name, value in limits.items():
        linux.write_file(os.path.join(directory, name), str(value).encode())


def _oom_killed(directory: str) -> bool:
    for name in ("memory.events", "memory.oom_control"):
        try:
            counters = linux.read_file(os.path.join(directory, name))
        except OSError:
            continue
        for line in counters.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"oom_kill" and value.strip() not in (b"", b"0"):
                return True
    return False


def _rmdir(directory: str) -> bool:
    try:
        os.rmdir(directory)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
