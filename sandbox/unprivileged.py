"""Run a function as an unprivileged user, from root, in a forked child.

Owns: ``call_as_user``, which the doctor uses to report what a non-root
deployment of this same host would get. The child drops to the given uid
and gid for good before it calls the function.

Must never: change anything outside the child. The only preparation it
makes is in a private mount namespace of the child: when the interpreter or
the project lives below a directory that other users cannot traverse (a
root-only home such as /root, a 0700 temporary checkout), it mounts a
0755 tmpfs over that directory and binds the needed paths back into it,
so the unprivileged child can load the same code. Nothing else becomes
visible, and the host's view is untouched.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from sandbox.runtime import linux


def call_as_user(fn: Callable[[], dict[str, Any]], uid: int, needed_paths: list[str]) -> dict[str, Any]:
    """Return ``fn()`` computed by a child running as ``uid``:``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            reachable = _make_reachable(needed_paths)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result = fn()
            result["remounted_for_reachability"] = reachable
            payload = json.dumps(result)
        except BaseException as exc:
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            try:
                os.write(write_end, payload.encode())
            finally:
                os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(b"".join(chunks) or b'{"error": "the child died without a report"}')
    return report


def interpreter_paths() -> list[str]:
    """Everything the child needs to read to run this interpreter and this project."""
    import sandbox

    paths = [sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix]
    paths += [p for p in sys.path if p and os.path.exists(p)]
    paths += [os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__)))]
    return sorted({os.path.abspath(p) for p in paths})


def _make_reachable(paths: list[str]) -> list[str]:
    """Make ``paths`` traversable by anyone, in a private mount namespace."""
    blockers: dict[str, list[str]] = {}
    for path in paths:
        blocker = _first_closed_ancestor(path)
        if blocker is not None:
            blockers.setdefault(blocker, []).append(path)
    if not blockers:
        return []
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    handles = {path: os.open(path, os.O_PATH) for group in blockers.values() for path in group}
    # Outermost blockers first; a nested blocker is hidden by its outer tmpfs anyway.
    outermost = [
        b for b in sorted(blockers, key=len) if not any(b != o and b.startswith(o.rstrip("/") + "/") for o in blockers)
    ]
    for blocker in outermost:
        linux.mount("tmpfs", blocker, "tmpfs", 0, "mode=0755")
    for path, handle in sorted(handles.items(), key=lambda item: len(item[0])):
        if os.path.lexists(path):
            continue  # already brought back as part of an enclosing path
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            os.makedirs(path, mode=0o755)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            open(path, "a").close()
        linux.mount(f"/proc/self/fd/{handle}", path, None, linux.MS_BIND | linux.MS_REC)
    return outermost


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost directory on the way to ``path`` that others cannot traverse."""
    current = "/"
    for part in [p for p in os.path.dirname(path).split("/") if p]:
        current = os.path.join(current, part)
        mode = os.stat(current).st_mode
        if not mode & stat.S_IXOTH:
            return current
    return None
