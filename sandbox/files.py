"""Files for one run, on the host: check what goes in, write what came out.

Owns: the rules for ``files=`` (names and sizes, checked before any worker
is used) and the one safe way to put a run's ``Result.files`` under a host
directory (the CLI's ``--out``).

Must never: open a path a worker named as it stands. Every name is checked
with ``runtime.wire.safe_relative_path`` (the wire decoder has already done
so once), and the writer walks the target directory one component at a time
through directory fds opened with ``O_NOFOLLOW``, so neither a ``..`` nor a
symbolic link already inside the directory can take a write outside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sandbox.errors import InputError
from sandbox.policies.model import MiB, Policy
from sandbox.runtime.files import open_dirs
from sandbox.runtime.wire import safe_relative_path


def check_files(files: Mapping[str, bytes] | None, policy: Policy) -> dict[str, bytes]:
    """The run's input files as a plain dict, or an ``InputError`` naming what is wrong."""
    if not files:
        return {}
    if not isinstance(files, Mapping):
        raise InputError(f"files must be a mapping of relative paths to bytes, not {type(files).__name__}")
    if policy.filesystem == "readonly":
        raise InputError("files= needs a writable working directory, and this tenant's filesystem is 'readonly'")
    checked: dict[str, bytes] = {}
    for path, data in files.items():
        if not safe_relative_path(path):
            raise InputError(
                f"file path {path!r} must be relative, without '..', '.', empty parts, NUL or a leading '/'"
            )
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"file {path!r} must be bytes, not {type(data).__name__}")
        checked[path] = content = bytes(data)  # a memoryview's len() counts items, not bytes
        if len(content) > policy.max_file_size_mb * MiB:
            raise InputError(
                f"file {path!r} takes {len(content)} bytes, over max_file_size_mb ({policy.max_file_size_mb})"
            )
    for path in checked:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in checked:
                raise InputError(f"file {path!r} would need {parent!r}, which is also a file, to be a directory")
            parent = parent.rpartition("/")[0]
    total = sum(len(data) for data in checked.values())
    if total > policy.scratch_mb * MiB:
        raise InputError(f"files take {total} bytes together, over the tenant's scratch_mb ({policy.scratch_mb} MiB)")
    return checked


def write_files(directory: Path, files: Mapping[str, bytes]) -> dict[str, str]:
    """Write each file under ``directory``; return the ones refused, path -> why.

    ``directory`` is created if missing. A path that is not a plain relative
    path, or whose way leads through a symbolic link or a non-directory, is
    refused and nothing is written for it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    refused: dict[str, str] = {}
    for path, data in files.items():
        if not safe_relative_path(path):
            refused[path] = "it would land outside the output directory"
            continue
        *parents, name = path.split("/")
        try:
            fd = open_dirs(str(directory), parents, create=True)
            try:
                out = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd
                )
            finally:
                os.close(fd)
            with open(out, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            refused[path] = f"cannot be written there: {exc.strerror}"
    return refused
