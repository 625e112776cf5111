"""Find and prepare the cgroup hierarchies that bound each worker.

Owns: choosing a ``pids`` and a ``memory`` controller (cgroup v2 when it is
delegated to us, else v1 as on many hosts), creating one parent group per
Sandbox under the supervisor's own groups, and the limit files each
worker's group gets. The zygote creates ``<parent>/w<id>`` per worker and
the worker joins it; see ``runtime.zygote``.

Must never: touch groups it did not create, or leave its parent groups
behind after ``remove()``. Groups of supervisors that died are removed by
``sandbox.leftovers``, through the kind registered here: their names carry
their owner's tag.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from sandbox import leftovers

_V1_ROOT = "/sys/fs/cgroup"
_PREFIX = "sandbox-"  # then the supervisor's pid (for people), its owner tag, and one per Sandbox


@dataclass
class CgroupParents:
    """The per-Sandbox parent groups: ``{directory: controller}``."""

    directories: dict[str, str]
    version: int

    @classmethod
    def create(cls) -> CgroupParents:
        """Create parent groups, or raise OSError saying why there are none."""
        if os.geteuid() != 0:
            raise OSError(1, "cgroups need root or a delegated cgroup v2 subtree; running unprivileged")
        name = f"{_PREFIX}{os.getpid()}-{leftovers.owner_tag()}-{secrets.token_hex(4)}"
        found = _v2_parent() or _v1_parents()
        if not found:
            raise OSError(2, "no writable pids and memory cgroup controllers found")
        version, parents = found
        made: dict[str, str] = {}
        try:
            for parent, controller in parents.items():
                directory = os.path.join(parent, name)
                os.mkdir(directory)
                made[directory] = controller
            if version == 2:
                (directory,) = made
                with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                    f.write("+pids +memory")
        except OSError:
            cls(made, version).remove()
            raise
        return cls(made, version)

    def worker_limits(self, *, max_tasks: int, memory_bytes: int) -> dict[str, dict[str, int]]:
        """Limit files for one worker's group, keyed by parent directory."""
        if self.version == 2:
            (directory,) = self.directories
            return {directory: {"pids.max": max_tasks, "memory.max": memory_bytes, "memory.swap.max": 0}}
        files = {"pids": {"pids.max": max_tasks}, "memory": {"memory.limit_in_bytes": memory_bytes}}
        return {directory: files[controller] for directory, controller in self.directories.items()}

    def usage_file(self, worker_groups: tuple[str, ...]) -> str | None:
        """The file that holds the memory charged to a worker's own group, one
        of ``worker_groups`` (the zygote's report); None if none of them is a
        group directly under our memory parent."""
        return self._own_file(
            worker_groups, "memory", "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        )

    def processes_file(self, worker_groups: tuple[str, ...]) -> str | None:
        """The list of every process in a worker's own pids group (the worker
        and whatever it started, wherever those were reparented); None as above."""
        return self._own_file(worker_groups, "pids", "cgroup.procs")

    def _own_file(self, worker_groups: tuple[str, ...], controller: str, name: str) -> str | None:
        for group in worker_groups:
            parent, leaf = os.path.split(group)
            found = self.directories.get(parent)
            if found is None or leaf in ("", ".", ".."):
                continue
            if self.version == 2 or found == controller:
                return os.path.join(group, name)
        return None

    def remove(self) -> None:
        for directory in self.directories:
            _remove_tree(directory)


def _remove_tree(directory: str) -> bool:
    """Remove a parent group and its workers' groups; False if the kernel still holds one."""
    for entry in _subgroups(directory):
        _rmdir(entry)
    return _rmdir(directory)


def _remove_dead_owners(dead: frozenset[str]) -> bool:
    """The parent groups that dead supervisors left next to where ours go; True when none is left."""
    found = (_v2_parent() or _v1_parents()) if os.geteuid() == 0 else None
    if not found:
        return True
    _, parents = found
    return all(
        [
            _remove_tree(entry)
            for parent in parents
            for entry in _subgroups(parent)
            if leftovers.owner_in(os.path.basename(entry), _PREFIX) in dead
        ]
    )


leftovers.register("cgroups", _remove_dead_owners)


def own_group(controller: str) -> str | None:
    """This process's cgroup path in the v1 hierarchy of ``controller``, if it has one."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    return None


def _v1_parents() -> tuple[int, dict[str, str]] | None:
    parents = {}
    for controller in ("pids", "memory"):
        own = own_group(controller)
        directory = os.path.join(_V1_ROOT, controller) + (own or "/")
        if (
            own is None
            or not os.access(directory, os.W_OK)
            or not os.path.exists(os.path.join(directory, "cgroup.procs"))
        ):
            return None
        parents[directory.rstrip("/")] = controller
    return 1, parents


def _v2_parent() -> tuple[int, dict[str, str]] | None:
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                mount = fields[4]
                break
    own = own_group("")
    if mount is None or own is None:
        return None
    directory = (mount + own).rstrip("/")
    try:
        # Our children get only what our own group enables for its subtree.
        with open(os.path.join(directory, "cgroup.subtree_control")) as f:
            available = f.read().split()
    except OSError:
        return None
    if not {"pids", "memory"} <= set(available) or not os.access(directory, os.W_OK):
        return None
    return 2, {directory: "pids+memory"}


def _subgroups(directory: str) -> list[str]:
    try:
        return [entry.path for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _rmdir(directory: str) -> bool:
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
