"""Files for one run, inside the worker: write the inputs, collect ./out/.

Owns: placing ``files=`` under the run's working directory before the code
starts, and, after it ended, reading back every regular file under
``./out/`` and every input file whose content the code changed, within the
policy's ``max_out_files`` and ``max_out_files_bytes``.

Must never: follow a symbolic link, or read anything but a regular file.
The run's code may have left anything where the files were, and may still
have a thread changing it while they are collected, so every step goes
through directory fds opened with ``O_NOFOLLOW``: a name is looked at with
``lstat`` and opened only if it is a regular file, and the opened fd is
checked again with ``fstat`` (``O_NONBLOCK`` keeps a FIFO swapped in between
from blocking the open). Devices, FIFOs and sockets are never opened; each is
reported in ``skipped_files`` with its kind. What this module returns is
still only the run's own account: the host checks every path and size again.

Why this discipline, when the worker reads with the run's own rights and so
could never reach more than the run itself: it is what the caller is told
(``Result.files`` holds regular files of ./out/ and nothing a link points
at), and a FIFO or a device opened by mistake could block the worker or act
on open. An input file is compared by inode, size, mtime and ctime with what
was written, and read back only when one of them changed, so an untouched
10 MiB input costs one ``stat``. Directories are walked to ``MAX_DEPTH``
levels and count against no limit (the wall-clock limit bounds the walk);
every other entry counts against ``max_out_files``.
"""

from __future__ import annotations

import os
import stat

from sandbox.runtime.wire import MAX_PATH_BYTES

OUT_DIR = "out"
MAX_DEPTH = 32  # directory levels under ./out/ that are walked
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "symbolic link (never followed)"),
    (stat.S_ISFIFO, "FIFO (never read)"),
    (stat.S_ISSOCK, "socket (never read)"),
    (stat.S_ISCHR, "character device (never read)"),
    (stat.S_ISBLK, "block device (never read)"),
)


class InputFileFailed(Exception):
    """An input file could not be written; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path


class TooManyFiles(Exception):
    """The collection passed a limit; ``limit`` names the policy field."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's content may have: inode, size, mtime and ctime
    (which no call can set back, so even a write followed by utime shows)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_inputs(cwd: str, files: dict[str, bytes]) -> dict[str, tuple[int, int, int, int]]:
    """Write each file at its relative path under ``cwd`` (paths checked by the host);
    return each one's :func:`signature`, so that an untouched input is never read back."""
    written = {}
    for path, data in files.items():
        parts = path.split("/")
        try:
            directory = open_dirs(cwd, parts[:-1], create=True)
            try:
                # O_TRUNC, not O_EXCL: a session's scratch keeps the files of its earlier runs.
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=directory)
            finally:
                os.close(directory)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                written[path] = signature(os.fstat(fd))
            finally:
                os.close(fd)
        except OSError as exc:
            raise InputFileFailed(path, f"{exc.strerror or exc}") from None
    return written


class Collection:
    """What the run left: files (path -> bytes) and skipped entries (path -> why)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.files: dict[str, bytes] = {}
        self.skipped: dict[str, str] = {}
        self._max_entries = max_entries
        self._bytes_left = max_bytes
        self._max_bytes = max_bytes

    def collect(
        self, cwd: str, inputs: dict[str, bytes], written: dict[str, tuple[int, int, int, int]] | None = None
    ) -> None:
        """Everything under ./out/ (keyed relative to it), then the changed inputs
        outside it (keyed by their input path; a name ./out/ already gave is reported instead)."""
        self._walk(cwd)
        prefix = OUT_DIR + "/"
        for path, sent in inputs.items():
            if path.startswith(prefix):
                continue  # collected above, if it is still there
            parts = path.split("/")
            try:
                directory = open_dirs(cwd, parts[:-1], create=False)
            except OSError:
                continue  # a directory on its way is gone: the input was removed, nothing to return
            try:
                self._entry(directory, parts[-1], path, unchanged_from=sent, written=(written or {}).get(path))
            finally:
                os.close(directory)

    def _walk(self, cwd: str) -> None:
        """Every entry under ./out/, depth first, to ``MAX_DEPTH`` directories.

        One directory fd is open at a time (a policy may allow only 16), each
        reached again from ``cwd`` one ``O_NOFOLLOW`` step at a time; the
        depth bound keeps those steps few.
        """
        pending: list[list[str]] = [[OUT_DIR]]
        while pending:
            parts = pending.pop()
            prefix = "/".join([*parts[1:], ""])  # relative to out/, with its trailing slash
            try:
                directory = open_dirs(cwd, parts, create=False)
            except OSError:
                if parts != [OUT_DIR]:  # the run removed ./out/ or put something else there: nothing
                    self._skip(prefix.rstrip("/"), "directory that could not be opened")
                continue
            try:
                subdirectories = []
                for name in sorted(os.listdir(directory)):
                    path = prefix + name
                    try:
                        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                    except OSError:
                        continue  # gone since it was listed
                    # As the wire will encode it; a name is at most 255 bytes, so the prefix is never empty here.
                    if len(path.encode("utf-8", "backslashreplace")) > MAX_PATH_BYTES:
                        self._skip(prefix.rstrip("/"), f"holds entries whose paths pass {MAX_PATH_BYTES} bytes")
                        break
                    if stat.S_ISDIR(st.st_mode) and len(parts) > MAX_DEPTH:
                        self._skip(path, f"directory nested deeper than {MAX_DEPTH} levels under ./out/ (not walked)")
                    elif stat.S_ISDIR(st.st_mode):
                        subdirectories.append([*parts, name])
                    else:
                        self._entry(directory, name, path, st=st)
            finally:
                os.close(directory)
            pending.extend(reversed(subdirectories))

    def _entry(
        self,
        directory: int,
        name: str,
        path: str,
        st: os.stat_result | None = None,
        unchanged_from: bytes | None = None,
        written: tuple[int, int, int, int] | None = None,
    ) -> None:
        if st is None:
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except OSError:
                return
        if not stat.S_ISREG(st.st_mode):
            kind = next((why for test, why in _KINDS if test(st.st_mode)), "not a regular file")
            if unchanged_from is None or not stat.S_ISDIR(st.st_mode):
                self._skip(path, kind)
            return
        if written is not None and signature(st) == written:
            return  # an input nothing touched since it was written
        # An input of its original size is read for comparison only, so it never counts against the budget.
        same_size = unchanged_from is not None and st.st_size == len(unchanged_from)
        data = self._read(directory, name, path, st.st_size if same_size else self._bytes_left)
        if data is None or data == unchanged_from:
            return
        if len(data) > self._bytes_left:
            self._over_bytes(path)
        if path in self.files:
            self._skip(path, "rewritten input whose name ./out/ also holds (the ./out/ file is returned)")
            return
        self._count()
        self._bytes_left -= len(data)
        self.files[path] = data

    def _read(self, directory: int, name: str, path: str, budget: int) -> bytes | None:
        """The file's bytes, or None if it is not a regular file any more; past ``budget``, a limit error."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=directory)
        except OSError as exc:
            self._skip(path, f"could not be opened: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._skip(path, "replaced by something other than a regular file while it was collected")
                return None
            if st.st_size > budget:
                self._over_bytes(path)
            chunks, total = [], 0
            while chunk := os.read(fd, min(1 << 20, budget - total + 1)):
                chunks.append(chunk)
                total += len(chunk)
                if total > budget:
                    self._over_bytes(path)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _skip(self, path: str, reason: str) -> None:
        self._count()
        self.skipped[path] = reason

    def _count(self) -> None:
        if len(self.files) + len(self.skipped) >= self._max_entries:
            raise TooManyFiles(
                "max_out_files",
                f"the run left more than {self._max_entries} files to return or report (max_out_files)",
            )

    def _over_bytes(self, path: str) -> None:
        raise TooManyFiles(
            "max_out_files_bytes",
            f"the run's files take more than {self._max_bytes} bytes together, reached at {path!r} "
            "(max_out_files_bytes)",
        )


def open_dirs(cwd: str, parts: list[str], *, create: bool) -> int:
    """An fd of ``cwd/parts...``, each step opened without following a link
    (made first if ``create``): the way can never leave ``cwd``."""
    fd = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root is the caller's own choice
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
