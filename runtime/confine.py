"""Confine a freshly forked worker before it ever sees user code.

Owns: the order in which OS layers are applied inside one worker, the
fail-closed rule, and the record of which directories are the worker's own
scratch space (so that nothing else is ever emptied between runs). The
zygote calls :func:`confine` in the child right after ``fork``; the child is
then pid 2 of a brand-new PID namespace whose pid 1 is a tiny init (see
``runtime.zygote``).

Must never: run user code, read anything from the supervisor's environment,
or carry on when a *required* layer could not be applied. A layer that is
attempted but not required and fails is reported as skipped, never silently
dropped: the supervisor shows it in the worker's hello and ``sandbox doctor``.

Order matters, and each step is placed where it is for a reason:

1. cgroups: joined earlier, by the standby worker (see ``runtime.zygote``),
   while the host's ``/sys/fs/cgroup`` was still visible; here only the
   outcome is recorded.
2. network namespace (setns into the zygote's shared empty one, or, with
   egress, into the worker's own, whose rules the zygote loaded before the
   worker was assigned; see ``runtime.egress``), then new IPC and UTS
   namespaces for this worker alone.
3. the file-system view: a copy of the zygote's template mount namespace
   (a tmpfs root with read-only binds of the interpreter and libraries and a
   minimal ``/dev``, see :func:`build_template`), plus the worker's own
   size-capped tmpfs for the scratch dir, ``/tmp`` and ``/dev/shm``, and a
   ``/proc`` of its own PID namespace.
4. ``no_new_privs`` (landlock and seccomp both need it when unprivileged).
5. landlock, which forbids mounts afterwards, so it comes after step 3.
6. identity: a dedicated uid/gid when the zygote is real root, otherwise
   drop every capability of the user namespace.
7. rlimits (soft = hard), the lower CPU priority, then the seccomp filter last, because it denies
   the mount/unshare/setns calls the steps above make.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.runtime import linux
from sandbox.runtime.files import OUT_DIR

SCRATCH_DIR = "/work"
# A worker's own fds: stdin, stdout, stderr, the channel and (when /proc lets
# it be opened) clear_refs. Every fd above them belongs to a run and is
# closed when the run ends.
CLEAR_REFS_FD = 4
WORKER_NICE = 10  # below the supervisor's nice value: CFS weight 110 against its 1024
_LOWEST_PRIORITY = 19  # the highest nice value

_MS_FROM_ST = {  # statvfs flag -> mount flag, for flags a user namespace locks on a bind
    os.ST_RDONLY: linux.MS_RDONLY,
    os.ST_NOSUID: linux.MS_NOSUID,
    os.ST_NODEV: linux.MS_NODEV,
    os.ST_NOEXEC: linux.MS_NOEXEC,
    os.ST_NOATIME: 1024,
    os.ST_NODIRATIME: 2048,
    os.ST_RELATIME: 1 << 21,
}
_DEVICES = ("null", "zero", "full", "random", "urandom")
_PRIVATE_TMPFS = (SCRATCH_DIR, "/tmp", "/dev/shm")
_STAGING = "/.scratch"  # the worker's tmpfs, mounted here only while its binds are made
_SOURCES = "/.sources"  # read-only sources that live under a scratch directory
_TEMPLATE_PROC = "/.proc"  # the template's proc; each worker detaches it once its own is mounted
# What every worker's view is built from, besides the interpreter's own paths:
# no tenant mount may cover one of these or sit inside it (sandbox.mounts).
RESERVED_PATHS = (
    *_PRIVATE_TMPFS,
    "/proc",
    "/dev",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    _STAGING,
    _SOURCES,
    _TEMPLATE_PROC,
)


class ConfinementFailed(Exception):
    """A required layer could not be applied; the worker must not run code."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


@dataclass(frozen=True)
class ScratchDir:
    """One directory a worker may empty between runs, pinned to its device.

    ``keep`` holds the entries present from the start (mount points of
    read-only binds that happen to live under /tmp), never removed.
    """

    path: str
    device: int
    keep: frozenset[str]

    @classmethod
    def of(cls, path: str) -> ScratchDir:
        return cls(path, os.lstat(path).st_dev, frozenset(os.listdir(path)))


@dataclass
class Scratch:
    """The worker's cwd and the directories it may empty between runs.

    All of ``dirs`` live on one file system, whose used-inode count right
    after confinement is ``inodes_at_start``. When that file system is the
    worker's own tmpfs (``private``), every entry on it that existed at
    start is a mount point or ./out/ itself, which no run can remove without
    ./out/ changing identity; so while the count has not grown and ./out/
    is the one the worker made, no run created anything and nothing needs a
    scan. On a file system shared with the host, other processes move the
    count both ways; there the scratch space is one directory the zygote
    made, and listing it and ./out/ is what proves them empty.
    """

    cwd: str
    dirs: list[ScratchDir] = field(default_factory=list)
    inodes_at_start: int = 0
    private: bool = False
    clear_refs: bool = False  # /proc/self/clear_refs is open on CLEAR_REFS_FD
    out_dir: tuple[int, int] | None = None  # (device, inode) of ./out/ as the worker made it

    @classmethod
    def of(cls, cwd: str, paths: tuple[str, ...], *, private: bool) -> Scratch:
        """``cwd`` holds ./out/, made empty by confinement: it is emptied like
        everything else (so not kept) and made again after each run."""
        st = os.statvfs(paths[0])
        dirs = [ScratchDir.of(path) for path in paths]
        dirs = [ScratchDir(d.path, d.device, d.keep - {OUT_DIR}) if d.path == cwd else d for d in dirs]
        out = os.lstat(os.path.join(cwd, OUT_DIR))
        return cls(cwd, dirs, st.f_files - st.f_ffree, private, out_dir=(out.st_dev, out.st_ino))

    def untouched(self) -> bool:
        """True when provably nothing was created here since confinement (see the class)."""
        out_path = os.path.join(self.cwd, OUT_DIR)
        try:
            out = os.lstat(out_path)
            if (out.st_dev, out.st_ino) != self.out_dir:
                return False
            if self.private:
                st = os.statvfs(self.cwd)
                return st.f_files - st.f_ffree <= self.inodes_at_start
            if len(self.dirs) != 1:
                return False
            return set(os.listdir(self.cwd)) - self.dirs[0].keep == {OUT_DIR} and not os.listdir(out_path)
        except OSError:
            return False


def confine(config: dict, netns_fd: int | None, template_fd: int | None) -> tuple[dict[str, str], Scratch]:
    """Apply every layer named in ``config['layers']``.

    Returns layer -> outcome ("on" or "off: <reason>") and the worker's
    scratch space. A required layer that fails raises
    :class:`ConfinementFailed` instead.
    """
    wanted: dict[str, bool] = config["layers"]
    report: dict[str, str] = {}

    def attempt(layer: str, action: Callable[..., object], *args: Any) -> None:
        if layer not in wanted:
            report[layer] = "off: not requested"
            return
        try:
            action(*args)
        except OSError as exc:
            if wanted[layer]:
                raise ConfinementFailed(layer, str(exc)) from None
            report[layer] = f"off: {exc}"
        else:
            report[layer] = "on"

    # The zygote already forked us as pid 2 of a new PID namespace, or could not.
    report["pidns"] = "on" if config["pid_namespace"] else "off: no PID namespace available"
    if wanted.get("pidns") and not config["pid_namespace"]:
        raise ConfinementFailed("pidns", "the zygote could not create PID namespaces")
    _raise_oom_score()
    attempt("cgroup", _cgroup_outcome, config.get("cgroup_error"))
    attempt("netns", _enter_netns, netns_fd, config["network"])
    attempt("ipcns", linux.unshare, linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    attempt("mountns", _enter_template, template_fd, config)
    scratch = _private_scratch() if report["mountns"] == "on" else _host_scratch(config["host_scratch"])
    # Opened now: once the worker has its own uid it is no longer dumpable,
    # and its /proc/self files belong to root.
    scratch.clear_refs = _open_clear_refs()
    linux.set_no_new_privs()
    writable_mounts = [target for _, target, writable in config["mounts"] if writable]
    attempt("landlock", _restrict_paths, report["mountns"] == "on", writable_mounts)
    attempt("identity", _drop_identity, config.get("uid"), config.get("gid"), config.get("groups", []))
    attempt("rlimits", _set_rlimits, config["rlimits"])
    _yield_cpu_to_the_supervisor()
    attempt("seccomp", linux.load_seccomp_bpf, config.get("seccomp_bpf") or b"")
    return report, scratch


def _private_scratch() -> Scratch:
    """Our own tmpfs, pinned by device so nothing else is ever emptied."""
    return Scratch.of(SCRATCH_DIR, _PRIVATE_TMPFS, private=True)


def _host_scratch(directory: str) -> Scratch:
    """Without a mount namespace: the empty directory the zygote made for this
    worker, and nothing else (never the host's /tmp or /dev/shm)."""
    os.chdir(directory)
    return Scratch.of(directory, (directory,), private=False)


def _open_clear_refs() -> bool:
    """Place /proc/self/clear_refs on CLEAR_REFS_FD; False if /proc says no."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    if fd != CLEAR_REFS_FD:
        os.dup2(fd, CLEAR_REFS_FD)
        os.close(fd)
    return True


def _raise_oom_score() -> None:
    """Make the worker the OOM killer's first choice, never the supervisor."""
    try:
        linux.write_file("/proc/self/oom_score_adj", b"1000")
    except OSError:
        pass


def _yield_cpu_to_the_supervisor() -> None:
    """Run at a lower CPU priority than the supervisor.

    On a machine with fewer cores than busy workers, the supervisor would
    otherwise wait its turn behind spinning user code, and every other run's
    reply, timeout and new request would wait with it. Without CAP_SYS_NICE
    (never held past confinement) the worker cannot raise it back.

    Lowered at the end of confinement, right before user code can run: the
    start itself is the supervisor's own work, and at nice 10 on a busy
    host it waited behind every other process, which made worker starts
    several times slower there.

    Relative to the nice value the worker inherited (the supervisor's), and
    capped at the lowest priority there is: a supervisor that itself runs
    niced (under a job scheduler, or in a Ray worker) must not have its
    workers ask for a higher priority than its own, which needs
    CAP_SYS_NICE and fails without it.
    """
    inherited = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, min(_LOWEST_PRIORITY, inherited + WORKER_NICE))


def join_cgroups(directories: list[str]) -> str | None:
    """Move this process into its groups; None, or why that failed.

    Called by a standby worker before it has a config: the move is slow
    (an RCU grace period), so it is done ahead of need.
    """
    if not directories:
        return "no cgroup hierarchy was delegated to the sandbox"
    try:
        for directory in directories:
            linux.write_file(os.path.join(directory, "cgroup.procs"), b"0")
    except OSError as exc:
        return f"cannot join {directory}: {exc.strerror}"
    return None


def _cgroup_outcome(error: str | None) -> None:
    if error:
        raise OSError(95, error)


def _enter_netns(netns_fd: int | None, network: bool) -> None:
    if network:
        raise OSError(1, "the policy allows network, so the host network namespace is kept")
    if netns_fd is None:
        raise OSError(95, "the zygote could not create an empty network namespace")
    linux.setns(netns_fd, linux.CLONE_NEWNET)


def build_template(readonly_paths: list[str], mounts: list[tuple[str, str, bool]], etc_files: list[str]) -> None:
    """Build the part of a worker's file-system view that all workers with
    the same paths share, in a new mount namespace of the calling process.

    ``readonly_paths`` (the interpreter and its libraries) appear at their
    own paths; each of the tenant's ``mounts`` (source, target, writable)
    shows a host path at its target. Every bind is remounted with nosuid and
    nodev, and read-only unless writable: the kernel then refuses writes
    there by every route (rename, link, a re-open of an ``O_PATH`` fd), on
    top of landlock. A symbolic link inside a mount resolves in the
    worker's own root, where nothing but these binds exists.

    Run by a short-lived helper of the zygote, which keeps the namespace
    (by fd) as a template. A worker then only copies it and adds what is its
    own (:func:`_enter_template`): a copy of ten mounts instead of building
    thirty and tearing down a copy of the host's, which is most of what
    starting and stopping a worker used to cost.
    """
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # Stage on a tmpfs over /tmp (hidden in this namespace only), then pivot
    # into it so the host tree is reachable as /oldroot while we bind from it,
    # whatever path the sources have (they may well live under /tmp).
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=4m")
    os.chdir("/tmp")
    os.mkdir("newroot")
    os.mkdir("oldroot")
    linux.pivot_root(".", "oldroot")
    os.chdir("/")
    linux.mount("/newroot", "/newroot", None, linux.MS_BIND)
    for directory in (SCRATCH_DIR, "/tmp", "/proc", _STAGING, _SOURCES, _TEMPLATE_PROC):
        os.makedirs("/newroot" + directory)
    # A user namespace may mount a new /proc only where a proc is already
    # fully visible; each worker mounts its own, then drops this one.
    linux.mount("proc", "/newroot" + _TEMPLATE_PROC, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    # Sources under a scratch directory would be hidden by the worker's own
    # scratch mount; they wait under /.sources and each worker binds them back.
    for index, path in enumerate(_shadowed(readonly_paths)):
        _bind_readonly("/oldroot" + path, f"/newroot{_SOURCES}/{index}")
    for path in readonly_paths:
        if path not in _shadowed(readonly_paths):
            _bind_readonly("/oldroot" + path, "/newroot" + path)
    for source, target, writable in mounts:
        # Checked at Sandbox start; gone since then means no template, not a worker without its data.
        if not os.path.exists("/oldroot" + source):
            raise OSError(2, f"mount source {source} no longer exists")
        _bind("/oldroot" + source, "/newroot" + target, writable=writable)
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink("/oldroot" + link) and not os.path.lexists("/newroot" + link):
            os.symlink(os.readlink("/oldroot" + link), "/newroot" + link)
        elif os.path.isdir("/oldroot" + link) and link in ("/lib", "/lib64"):
            _bind_readonly("/oldroot" + link, "/newroot" + link)
    _populate_etc(etc_files)
    _populate_dev()
    os.chdir("/newroot")
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")
    _remount("/dev")
    _remount("/")


def _enter_template(template_fd: int | None, config: dict) -> None:
    """Copy the template view and add this worker's own mounts to it.

    Everything a run may write lives on one size-capped tmpfs, bound at
    /work, /tmp and /dev/shm: one cap for all of it, and one statvfs after a
    run tells whether anything needs emptying.
    """
    if template_fd is None:
        raise OSError(95, config.get("template_error") or "no file-system template")
    linux.setns(template_fd, linux.CLONE_NEWNS)  # root and cwd move to the template's root
    try:
        _add_own_mounts(config)
    except OSError as exc:
        # Past setns the host view is gone: no degrading to "off" from here.
        raise ConfinementFailed("mountns", str(exc)) from None


def _add_own_mounts(config: dict) -> None:
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWCGROUP)
    uid, gid = _worker_ids(config)
    linux.mount(
        "tmpfs", _STAGING, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"mode=0755,size={config['scratch_bytes']}"
    )
    for name, mode in (("work", 0o700), (f"work/{OUT_DIR}", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(f"{_STAGING}/{name}")
        os.chmod(f"{_STAGING}/{name}", mode)
    os.chown(f"{_STAGING}/work", uid, gid)
    os.chown(f"{_STAGING}/work/{OUT_DIR}", uid, gid)
    linux.write_file(
        f"{_STAGING}/passwd", f"sandbox:x:{uid}:{gid}:sandbox:{SCRATCH_DIR}:/nonexistent\n".encode(), create=True
    )
    linux.write_file(f"{_STAGING}/group", f"sandbox:x:{gid}:\n".encode(), create=True)
    own_files = [("passwd", "/etc/passwd"), ("group", "/etc/group")]
    if config.get("egress") is not None:
        # The names the supervisor resolved and pinned for this worker alone.
        linux.write_file(f"{_STAGING}/hosts", config["egress"]["hosts"].encode(), create=True)
        own_files.append(("hosts", "/etc/hosts"))
    for source, target in (("work", SCRATCH_DIR), ("tmp", "/tmp"), ("shm", "/dev/shm"), *own_files):
        linux.mount(f"{_STAGING}/{source}", target, None, linux.MS_BIND)
    for index, path in enumerate(_shadowed(config["readonly_paths"])):
        source = f"{_SOURCES}/{index}"
        _make_mount_point(source, path)
        linux.mount(source, path, None, linux.MS_BIND)
    linux.umount(_STAGING, linux.MNT_DETACH)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.umount(_TEMPLATE_PROC, linux.MNT_DETACH)
    if config["readonly"]:
        for target in _PRIVATE_TMPFS:
            _remount(target)
    os.chdir(SCRATCH_DIR)


def _shadowed(paths: list[str]) -> list[str]:
    """The paths that live under a directory each worker mounts its scratch on."""
    return [p for p in paths if any(p.startswith(d + "/") for d in _PRIVATE_TMPFS)]


def _worker_ids(config: dict) -> tuple[int, int]:
    """The uid/gid the worker will run as, as seen inside its namespaces."""
    if config.get("uid") is not None:
        return config["uid"], config["gid"]
    return config["userns_id"], config["userns_id"]


def _bind_readonly(source: str, target: str) -> None:
    if os.path.exists(source):
        _bind(source, target, writable=False)


def _bind(source: str, target: str, *, writable: bool) -> None:
    _make_mount_point(source, target)
    linux.mount(source, target, None, linux.MS_BIND)
    _remount(target, locked=os.statvfs(source).f_flag, writable=writable)


def _make_mount_point(source: str, target: str) -> None:
    """A directory or an empty file at ``target``, whichever ``source`` is, to bind it onto."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def _remount(target: str, locked: int | None = None, writable: bool = False) -> None:
    """Remount a bind nosuid, nodev and (unless ``writable``) read-only, keeping
    the flags a user namespace locks (a read-only source stays read-only)."""
    if locked is None:
        locked = os.statvfs(target).f_flag
    flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NODEV
    if not writable:
        flags |= linux.MS_RDONLY
    for st_flag, ms_flag in _MS_FROM_ST.items():
        if locked & st_flag:
            flags |= ms_flag
    linux.mount(None, target, None, flags)


def _populate_etc(etc_files: list[str]) -> None:
    """A few host /etc entries, copied rather than bound: a copy costs one
    write, a read-only bind two mount calls. Directories are bound. passwd
    and group are empty mount points: each worker binds its own."""
    os.makedirs("/newroot/etc", exist_ok=True)
    for name in etc_files:
        source, target = "/oldroot/etc/" + name, "/newroot/etc/" + name
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isfile(source):
            shutil.copyfile(source, target)
        elif os.path.isdir(source):
            _bind_readonly(source, target)
    for name in ("passwd", "group"):
        open(f"/newroot/etc/{name}", "w").close()
    with open("/newroot/etc/hostname", "w") as f:
        f.write("sandbox\n")


def _populate_dev() -> None:
    os.mkdir("/newroot/dev")
    linux.mount("tmpfs", "/newroot/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755,size=64k")
    for name in _DEVICES:
        target = "/newroot/dev/" + name
        open(target, "w").close()
        linux.mount("/oldroot/dev/" + name, target, None, linux.MS_BIND)
    for name, dest in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(dest, "/newroot/dev/" + name)
    os.mkdir("/newroot/dev/shm")


def _restrict_paths(filesystem_confined: bool, writable_mounts: list[str]) -> None:
    if not filesystem_confined:
        raise OSError(95, "landlock rules assume the confined file-system view")
    writable = [*_PRIVATE_TMPFS, "/dev/null", "/dev/zero", "/dev/full", *writable_mounts]
    linux.landlock_restrict(["/"], writable)


def _drop_identity(uid: int | None, gid: int | None, groups: list[int]) -> None:
    """``groups``: the one group that grants workers their mounts (see README), or none."""
    linux.drop_bounding_set()
    if uid is None:
        # Unprivileged supervisor: we are in the zygote's user namespace with
        # its full capability set. Shed it all.
        linux.clear_capabilities()
        return
    if gid is None:
        raise OSError(22, "a worker uid comes without its gid")
    # Real root: becoming a uid of our own empties every capability set.
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(1, "setresuid did not take effect")


_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
    "stack": resource.RLIMIT_STACK,
    "nproc": resource.RLIMIT_NPROC,
}


def _set_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    for name, (soft, hard) in limits.items():
        resource.setrlimit(_RLIMITS[name], (soft, hard))
    # A core dump of a worker could leak its memory onto the host.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def reset_signals() -> None:
    """Undo what the zygote changed, leaving Python's usual dispositions."""
    linux.reset_signal_state(defaults=(signal.SIGCHLD,))
