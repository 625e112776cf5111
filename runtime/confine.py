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

1. cgroup join first, while the host's ``/sys/fs/cgroup`` is still visible.
2. network namespace (setns into the zygote's shared empty one), then new
   IPC and UTS namespaces for this worker alone.
3. the file-system view in a new mount namespace: a tmpfs root, one
   size-capped tmpfs for the scratch dir, ``/tmp`` and ``/dev/shm``, read-only binds of
   the interpreter and libraries, a minimal ``/dev`` and a ``/proc`` of the
   worker's own PID namespace; then ``pivot_root`` and detach the host tree.
4. ``no_new_privs`` (landlock and seccomp both need it when unprivileged).
5. landlock, which forbids mounts afterwards, so it comes after step 3.
6. identity: a dedicated uid/gid when the zygote is real root, otherwise
   drop every capability of the user namespace.
7. rlimits (soft = hard), then the seccomp filter last, because it denies
   the mount/unshare/setns calls the steps above make.
"""

from __future__ import annotations

import os
import resource
import signal
from dataclasses import dataclass, field

from runtime import linux

SCRATCH_DIR = "/work"
WORKER_PID_IN_NAMESPACE = 2  # pid 1 is the namespace's init; the worker is forked right after it.

_MS_FROM_ST = {  # statvfs flag -> mount flag, for flags a user namespace locks on a bind
    os.ST_RDONLY: linux.MS_RDONLY, os.ST_NOSUID: linux.MS_NOSUID, os.ST_NODEV: linux.MS_NODEV,
    os.ST_NOEXEC: linux.MS_NOEXEC, os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21,
}
_DEVICES = ("null", "zero", "full", "random", "urandom")
_PRIVATE_TMPFS = (SCRATCH_DIR, "/tmp", "/dev/shm")


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
    def of(cls, path: str) -> "ScratchDir":
        return cls(path, os.lstat(path).st_dev, frozenset(os.listdir(path)))


@dataclass
class Scratch:
    """The worker's cwd and the directories it may empty between runs.

    All of ``dirs`` live on one file system, whose used-inode count right
    after confinement is ``inodes_at_start``: while it has not grown, no run
    created anything and nothing needs a scan.
    """

    cwd: str
    dirs: list[ScratchDir] = field(default_factory=list)
    inodes_at_start: int = 0
    clear_refs: int | None = None  # /proc/self/clear_refs, to reset the peak-RSS mark per run

    @classmethod
    def of(cls, cwd: str, paths: tuple[str, ...]) -> "Scratch":
        st = os.statvfs(paths[0])
        return cls(cwd, [ScratchDir.of(path) for path in paths], st.f_files - st.f_ffree)


def confine(config: dict, empty_netns_fd: int | None) -> tuple[dict[str, str], Scratch]:
    """Apply every layer named in ``config['layers']``.

    Returns layer -> outcome ("on" or "off: <reason>") and the worker's
    scratch space. A required layer that fails raises
    :class:`ConfinementFailed` instead.
    """
    wanted: dict[str, bool] = config["layers"]
    report: dict[str, str] = {}

    def attempt(layer: str, action, *args) -> None:
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
    attempt("cgroup", _join_cgroups, config.get("cgroup_dirs") or [])
    attempt("netns", _enter_netns, empty_netns_fd, config["network"])
    attempt("ipcns", linux.unshare, linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    attempt("mountns", _build_root, config)
    scratch = _private_scratch() if report["mountns"] == "on" else _host_scratch(config["host_scratch"])
    # Opened now: once the worker has its own uid it is no longer dumpable,
    # and its /proc/self files belong to root.
    scratch.clear_refs = _open_clear_refs()
    linux.set_no_new_privs()
    attempt("landlock", _restrict_paths, report["mountns"] == "on")
    attempt("identity", _drop_identity, config.get("uid"), config.get("gid"))
    attempt("rlimits", _set_rlimits, config["rlimits"])
    attempt("seccomp", linux.load_seccomp_bpf, config.get("seccomp_bpf") or b"")
    return report, scratch


def _private_scratch() -> Scratch:
    """Our own tmpfs, pinned by device so nothing else is ever emptied."""
    return Scratch.of(SCRATCH_DIR, _PRIVATE_TMPFS)


def _host_scratch(directory: str) -> Scratch:
    """Without a mount namespace: the empty directory the zygote made for this
    worker, and nothing else (never the host's /tmp or /dev/shm)."""
    os.chdir(directory)
    return Scratch.of(directory, (directory,))


def _open_clear_refs() -> int | None:
    try:
        return os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _raise_oom_score() -> None:
    """Make the worker the OOM killer's first choice, never the supervisor."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _join_cgroups(dirs: list[str]) -> None:
    if not dirs:
        raise OSError(95, "no cgroup hierarchy was delegated to the sandbox")
    for directory in dirs:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write("0")


def _enter_netns(empty_netns_fd: int | None, network: bool) -> None:
    if network:
        raise OSError(1, "the policy allows network, so the host network namespace is kept")
    if empty_netns_fd is None:
        raise OSError(95, "the zygote could not create an empty network namespace")
    linux.setns(empty_netns_fd, linux.CLONE_NEWNET)


def _build_root(config: dict) -> None:
    """Replace the host file-system view with a minimal read-only one."""
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWCGROUP)
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

    # Everything a run may write lives on one size-capped tmpfs, bound at
    # /work, /tmp and /dev/shm: one cap for all of it, and one statvfs after
    # a run tells whether anything needs emptying. It is bound first, so that
    # a read-only source that happens to live under /tmp (a checkout, a venv)
    # is bound on top of it and stays visible.
    uid, gid = _worker_ids(config)
    os.mkdir("/scratch")
    linux.mount("tmpfs", "/scratch", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"mode=0755,size={config['scratch_bytes']}")
    for name, mode in (("work", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(f"/scratch/{name}")
        os.chmod(f"/scratch/{name}", mode)
    os.chown("/scratch/work", uid, gid)
    _bind_scratch("/scratch/work", "/newroot" + SCRATCH_DIR)
    _bind_scratch("/scratch/tmp", "/newroot/tmp")
    for path in config["readonly_paths"]:
        _bind_readonly("/oldroot" + path, "/newroot" + path)
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink("/oldroot" + link) and not os.path.lexists("/newroot" + link):
            os.symlink(os.readlink("/oldroot" + link), "/newroot" + link)
        elif os.path.isdir("/oldroot" + link) and link in ("/lib", "/lib64"):
            _bind_readonly("/oldroot" + link, "/newroot" + link)

    _populate_etc(uid, gid, config["etc_files"])
    _populate_dev()
    _bind_scratch("/scratch/shm", "/newroot/dev/shm")
    if config["readonly"]:
        # Last, so that read-only sources bound under /tmp could be mounted first.
        for target in _PRIVATE_TMPFS:
            _remount_readonly("/newroot" + target)
    os.mkdir("/newroot/proc")
    linux.mount("proc", "/newroot/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)

    os.chdir("/newroot")
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")
    _remount_readonly("/dev")
    _remount_readonly("/")
    os.chdir(SCRATCH_DIR)


def _bind_scratch(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    linux.mount(source, target, None, linux.MS_BIND)


def _worker_ids(config: dict) -> tuple[int, int]:
    """The uid/gid the worker will run as, as seen inside its namespaces."""
    if config.get("uid") is not None:
        return config["uid"], config["gid"]
    return config["userns_id"], config["userns_id"]


def _bind_readonly(source: str, target: str) -> None:
    if not os.path.exists(source):
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    linux.mount(source, target, None, linux.MS_BIND)
    _remount_readonly(target, locked=os.statvfs(source).f_flag)


def _remount_readonly(target: str, locked: int | None = None) -> None:
    if locked is None:
        locked = os.statvfs(target).f_flag
    flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    for st_flag, ms_flag in _MS_FROM_ST.items():
        if locked & st_flag:
            flags |= ms_flag
    linux.mount(None, target, None, flags)


def _populate_etc(uid: int, gid: int, etc_files: list[str]) -> None:
    os.makedirs("/newroot/etc", exist_ok=True)
    for name in etc_files:
        _bind_readonly("/oldroot/etc/" + name, "/newroot/etc/" + name)
    with open("/newroot/etc/passwd", "w") as f:
        f.write(f"sandbox:x:{uid}:{gid}:sandbox:{SCRATCH_DIR}:/nonexistent\n")
    with open("/newroot/etc/group", "w") as f:
        f.write(f"sandbox:x:{gid}:\n")
    with open("/newroot/etc/hostname", "w") as f:
        f.write("sandbox\n")


def _populate_dev() -> None:
    os.mkdir("/newroot/dev")
    linux.mount("tmpfs", "/newroot/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755,size=64k")
    for name in _DEVICES:
        target = "/newroot/dev/" + name
        open(target, "w").close()
        linux.mount("/oldroot/dev/" + name, target, None, linux.MS_BIND)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, "/newroot/dev/" + name)


def _restrict_paths(filesystem_confined: bool) -> None:
    if not filesystem_confined:
        raise OSError(95, "landlock rules assume the confined file-system view")
    writable = [*_PRIVATE_TMPFS, "/dev/null", "/dev/zero", "/dev/full"]
    linux.landlock_restrict(["/"], writable)


def _drop_identity(uid: int | None, gid: int | None) -> None:
    linux.drop_bounding_set()
    if uid is None:
        # Unprivileged supervisor: we are in the zygote's user namespace with
        # its full capability set. Shed it all.
        linux.clear_capabilities()
        return
    # Real root: becoming a uid of our own empties every capability set.
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(1, "setresuid did not take effect")


_RLIMITS = {
    "cpu": resource.RLIMIT_CPU, "data": resource.RLIMIT_DATA, "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE, "stack": resource.RLIMIT_STACK,
    "nproc": resource.RLIMIT_NPROC,
}


def _set_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    for name, (soft, hard) in limits.items():
        resource.setrlimit(_RLIMITS[name], (soft, hard))
    # A core dump of a worker could leak its memory onto the host.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def reset_signals() -> None:
    """Undo what the zygote changed, leaving Python's usual dispositions."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
