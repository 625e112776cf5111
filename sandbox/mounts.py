"""Check a tenant's host mounts before any worker gets them.

Owns: the start-up rules for ``mounts`` that the policy model cannot decide
alone, because they depend on this host: the source must exist; the target
must not cover or sit inside what every worker's view is built from (the
interpreter and its libraries, ``/proc``, ``/dev``, ``/etc``, ``/tmp``, the
scratch directory); and the workers' uid must be able to read the source (and
write it, for a writable mount). ``sandbox doctor --policy`` reports the same
problems.

Must never: change anything on the host. Readability is tried, not guessed
from mode bits (ACLs and groups count): a forked child takes the identity a
worker would have and asks the kernel with ``access``.
"""

from __future__ import annotations

import json
import os

from sandbox.errors import MountError
from sandbox.policies.model import Policy
from sandbox.profile import MOUNT_GID, UID_BASE
from sandbox.runtime.confine import RESERVED_PATHS
from sandbox.runtime.zygote import interpreter_paths

# Never a worker's own uid (those start at UID_BASE), but one just like them.
_PROBE_UID = UID_BASE - 2


def check_mounts(tenant: str, policy: Policy, root: bool) -> None:
    """Raise the first problem of ``tenant``'s mounts as a ``MountError``."""
    problems = mount_problems(tenant, policy, root)
    if problems:
        raise problems[0]


def mount_problems(tenant: str, policy: Policy, root: bool) -> list[MountError]:
    """Every problem of ``tenant``'s mounts on this host, each naming tenant, field and path."""
    problems: list[MountError] = []
    reserved = [*RESERVED_PATHS, *interpreter_paths()]
    to_try: list[tuple[int, str, int]] = []
    for index, mount in enumerate(policy.mounts):
        source_field, target_field = f"mounts[{index}].source", f"mounts[{index}].target"
        clash = next((path for path in reserved if _overlap(mount.target, path)), None)
        if clash is not None:
            problems.append(
                MountError(
                    f"tenant {tenant!r}: {target_field} {mount.target!r} covers or lies inside {clash!r}, "
                    "which every worker needs as it is; choose another target (e.g. /data or /output)",
                    tenant=tenant,
                    field=target_field,
                    path=mount.target,
                )
            )
        if not os.path.exists(mount.source):
            problems.append(
                MountError(
                    f"tenant {tenant!r}: {source_field} {mount.source!r} does not exist on this host",
                    tenant=tenant,
                    field=source_field,
                    path=mount.source,
                )
            )
            continue
        mode = os.R_OK | (os.X_OK if os.path.isdir(mount.source) else 0) | (os.W_OK if mount.writable else 0)
        to_try.append((index, mount.source, mode))
    for (index, source, mode), allowed in zip(to_try, _accessible(to_try, root), strict=True):
        if not allowed:
            problems.append(_unreadable(tenant, index, source, mode, root))
    return problems


def unreadable_inside(policy: Policy, root: bool, limit: int = 1000) -> list[str]:
    """Entries below each mounted directory that the workers could not read, among
    the first ``limit`` of each: what ``sandbox doctor --policy`` lists as notes.

    Sandbox start checks only each source itself (a walk of a large tree
    would slow every start), so a single unreadable file deep inside shows
    up only in the run that opens it, as a PermissionError; this is where
    an operator finds it beforehand.
    """
    checks: list[tuple[int, str, int]] = []
    for index, mount in enumerate(policy.mounts):
        if not os.path.isdir(mount.source):
            continue
        seen = 0
        for directory, subdirectories, names in os.walk(mount.source):
            for name in subdirectories:
                checks.append((index, os.path.join(directory, name), os.R_OK | os.X_OK))
            checks.extend((index, os.path.join(directory, name), os.R_OK) for name in names)
            seen += len(subdirectories) + len(names)
            if seen >= limit:
                break
    links = {path for _, path, _ in checks if os.path.islink(path)}  # resolved inside the sandbox, not here
    checks = [check for check in checks if check[1] not in links]
    return [path for (_, path, _), allowed in zip(checks, _accessible(checks, root), strict=True) if not allowed]


def _overlap(target: str, reserved: str) -> bool:
    """``target`` is ``reserved``, above it, or inside it."""
    return target == reserved or reserved.startswith(target + "/") or target.startswith(reserved.rstrip("/") + "/")


def _unreadable(tenant: str, index: int, source: str, mode: int, root: bool) -> MountError:
    access = "read and write" if mode & os.W_OK else "read"
    letters = "rwX" if mode & os.W_OK else "rX"
    if root:
        how = (
            f"each worker runs as a uid of its own, with group {MOUNT_GID}; grant that group access, e.g. "
            f"`setfacl -R -m g:{MOUNT_GID}:{letters} {source}` (or chgrp -R {MOUNT_GID} and chmod -R g+{letters}), "
            "and search (x) on every directory above it"
        )
    else:
        how = f"workers run as this supervisor's uid ({os.getuid()}); give that user {access} access to it"
    return MountError(
        f"tenant {tenant!r}: mounts[{index}].source {source!r} cannot be given {access} access by the workers: {how}",
        tenant=tenant,
        field=f"mounts[{index}].source",
        path=source,
    )


def _accessible(checks: list[tuple[int, str, int]], root: bool) -> list[bool]:
    """For each (index, path, mode): may a worker access it so? Asked of the kernel."""
    if not checks:
        return []
    if not root:  # unprivileged workers are this uid in a user namespace of their own
        return [os.access(path, mode) for _, path, mode in checks]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([MOUNT_GID])
            os.setresgid(_PROBE_UID, _PROBE_UID, _PROBE_UID)
            os.setresuid(_PROBE_UID, _PROBE_UID, _PROBE_UID)
            os.write(write_end, json.dumps([os.access(path, mode) for _, path, mode in checks]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answers:
        data = answers.read()
    os.waitpid(pid, 0)
    try:
        result = json.loads(data)
    except ValueError:
        return [False] * len(checks)
    return [bool(value) for value in result]
