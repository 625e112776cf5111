"""Start, drive and clean up a hostile-test harness (``tests.hostile.harness``).

The harness, and with it the supervisor under test and its whole pool, runs
in a throwaway PID namespace made by ``unshare --pid --fork --kill-child
--mount-proc``: if the harness dies or is killed, the kernel kills every
process of the namespace. As root the namespace also lives in fresh child
groups of this process's own ``pids`` (with ``pids.max``) and ``memory``
cgroups; the launching shell moves itself in before it execs ``unshare``, so
nothing of the harness ever runs outside them, and the groups are removed
with everything the Sandbox created under them.

``unprivileged=True`` runs the harness as uid 65534. The interpreter may
live below a directory others cannot traverse (``/root``), so, inside a
private mount namespace, the blocked directory's needed child is bound
aside, a 0755 tmpfs is mounted over the blocked directory and the child is
moved back; only then does ``setpriv`` drop to uid 65534. The project's
packages are copied into a fresh world-readable directory first, because
the checkout itself may be private.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import selectors
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import psutil

from sandbox.cgroups import own_group
from tests.hostile.harness import SECRET_VARIABLE

REPO = Path(__file__).resolve().parent.parent.parent
HARNESS = Path(__file__).with_name("harness.py")
UNPRIVILEGED_UID = 65534
PIDS_MAX = 512
_CGROUP_V1 = Path("/sys/fs/cgroup")
_REQUEST_TIMEOUT_S = 60.0
_STDERR_TAIL_BYTES = 4000


class HarnessDied(Exception):
    """The harness (the supervisor under test) died or stopped answering."""


class ThrowawayCgroups:
    """Child groups of this process's own v1 ``pids`` and ``memory`` groups."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories

    @classmethod
    def create(cls) -> ThrowawayCgroups | None:
        """The groups, or None when not root or the v1 hierarchies are missing."""
        if os.geteuid() != 0:
            return None
        name = f"hostile-{os.getpid()}-{secrets.token_hex(4)}"
        directories = []
        for controller in ("pids", "memory"):
            own = own_group(controller)
            if own is None or not (_CGROUP_V1 / controller / own.lstrip("/") / "cgroup.procs").exists():
                return None
            directories.append(_CGROUP_V1 / controller / own.lstrip("/") / name)
        made = cls([])
        try:
            for directory in directories:
                directory.mkdir()
                made.directories.append(directory)
            (directories[0] / "pids.max").write_text(str(PIDS_MAX))
        except OSError:
            made.remove()
            raise
        return made

    def enter_then_exec(self) -> list[str]:
        """A command prefix that moves itself into every group, then execs the rest."""
        procs = " ".join(shlex.quote(str(d / "cgroup.procs")) for d in self.directories)
        return ["sh", "-c", f'for f in {procs}; do echo $$ > "$f" || exit 97; done; exec "$@"', "sh"]

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the groups and every group below them, deepest first."""
        deadline = time.monotonic() + timeout_s
        for directory in self.directories:
            while directory.exists():
                below = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
                for group in [*below, directory]:
                    try:
                        group.rmdir()
                    except OSError:
                        pass
                if not directory.exists() or time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def unprivileged_unavailable() -> str | None:
    """Why the unprivileged harness cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root, to drop to uid 65534 inside a private mount namespace"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    try:
        _reachability_mounts()
    except ValueError as exc:
        return str(exc)
    return None


def _interpreter_paths() -> list[str]:
    """What uid 65534 must be able to read to run this interpreter and its dependencies."""
    import cloudpickle
    import psutil
    import pydantic
    import pyseccomp
    import uvloop

    paths = [sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, sys.exec_prefix]
    paths += [
        os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
        for m in (cloudpickle, psutil, pydantic, pyseccomp, uvloop)
    ]
    return sorted({os.path.abspath(p) for p in paths})


def _reachability_mounts() -> tuple[str, str] | None:
    """(blocked directory, its child to keep) for the interpreter, or None if all is reachable.

    Raises ValueError when more than one blocked place would have to be opened.
    """
    needed = set()
    for path in _interpreter_paths():
        current = "/"
        for part in [p for p in path.split("/") if p]:
            child = os.path.join(current, part)
            if current != "/" and not os.stat(current).st_mode & stat.S_IXOTH:
                needed.add((current, child))
                break
            current = child
    if len(needed) > 1:
        raise ValueError(f"the interpreter needs several private directories opened: {sorted(needed)}")
    return next(iter(needed), None)


def stage_sources() -> str:
    """A fresh 0755 copy of the package under test (its linked subpackages
    copied as folders) and of the harness."""
    stage = tempfile.mkdtemp(prefix="hostile-stage-")
    shutil.copytree(REPO / "sandbox", os.path.join(stage, "sandbox"), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HARNESS, os.path.join(stage, HARNESS.name))
    for root, _, files in os.walk(stage):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return stage


_DROP_PRIVILEGES = f"""
set -e
blocked=$1 keep=$2 aside=$3
shift 3
if [ -n "$blocked" ]; then
    mkdir -p "$aside"
    mount --bind "$keep" "$aside"
    mount -t tmpfs -o mode=0755 tmpfs "$blocked"
    mkdir -p "$keep"
    mount --move "$aside" "$keep"
fi
exec setpriv --reuid={UNPRIVILEGED_UID} --regid={UNPRIVILEGED_UID} --clear-groups "$@"
"""


def kill_namespace(unshare: subprocess.Popen) -> None:
    """SIGKILL the PID namespace that ``unshare --fork`` (the ``unshare`` process) made.

    Its first process is the namespace's init, whose death takes every
    other process of the namespace with it. ``--kill-child`` alone does not
    do that once ``setpriv`` has dropped the child's uid: the kernel clears
    the parent-death signal when a process's credentials change.
    """
    try:
        for child in psutil.Process(unshare.pid).children():
            child.kill()
    except psutil.Error:
        pass
    unshare.kill()
    unshare.wait()


def unprivileged_command(stage: str, arguments: list[str]) -> list[str]:
    """This interpreter, run with ``arguments`` as uid 65534 in a private mount
    and PID namespace where it can reach itself (see the module docstring);
    ``stage`` is a directory from :func:`stage_sources`."""
    blocked, keep = _reachability_mounts() or ("", "")
    python = sys.executable  # not resolved: a virtual environment is found through it
    return [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        _DROP_PRIVILEGES,
        "sh",
        blocked,
        keep,
        os.path.join(stage, "aside"),
        python,
        "-I",
        *arguments,
    ]


class HarnessProcess:
    """One harness: a Sandbox with ``tenants`` (name -> Policy overrides) and ``workers``.

    Started lazily, and again on the request after the one that found it
    dead; that request raises :class:`HarnessDied`, naming how it died.
    """

    def __init__(self, tenants: dict[str, dict], *, workers: int = 2, unprivileged: bool = False) -> None:
        self.tenants = tenants
        self.workers = workers
        self.unprivileged = unprivileged
        self.secret = secrets.token_hex(16)
        self._process: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._cgroups: ThrowawayCgroups | None = None
        self._stage: str | None = None
        self._buffer = b""

    # --- life ------------------------------------------------------------------

    def _command(self) -> list[str]:
        config = json.dumps({"tenants": self.tenants, "workers": self.workers})
        python = sys.executable  # not resolved: a virtual environment is found through it
        if not self.unprivileged:
            namespace = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if os.geteuid() != 0:
                namespace.insert(1, "--map-current-user")
            return [*namespace, python, "-I", str(HARNESS), str(REPO), config]
        if self._stage is None:
            self._stage = stage_sources()
        return unprivileged_command(self._stage, [os.path.join(self._stage, HARNESS.name), self._stage, config])

    def start(self) -> None:
        self._cgroups = ThrowawayCgroups.create()
        prefix = self._cgroups.enter_then_exec() if self._cgroups else []
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the process's life
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", SECRET_VARIABLE: self.secret}
        self._process = subprocess.Popen(
            [*prefix, *self._command()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd="/",
        )
        self._buffer = b""

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The harness's outermost process (``unshare``), once started."""
        assert self._process is not None, "the harness starts with its first request"
        return self._process.pid

    def stop(self) -> None:
        """Close the harness (its Sandbox shuts down), or kill its namespace if it hangs."""
        if self._process is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_namespace(self._process)
            self._process.stdout.close()
            self._process = None
        if self._cgroups is not None:
            self._cgroups.remove()
            self._cgroups = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        self.stop()
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - _STDERR_TAIL_BYTES))
        return self._stderr.read().decode(errors="replace")

    # --- requests ---------------------------------------------------------------

    def request(self, payload: dict, timeout_s: float = _REQUEST_TIMEOUT_S) -> dict:
        """Send one request and return its answer.

        Raises HarnessDied if the harness dies or hangs during the request,
        or if it died after answering the previous one; the next request
        then starts a fresh harness.
        """
        if self._process is not None and not self.alive():
            detail = f"exit status {self._process.poll()}; stderr:\n{self.stderr_tail()}"
            self.stop()
            raise HarnessDied(
                f"the harness (the supervisor under test) died after answering its previous request: {detail}"
            )
        if self._process is None:
            self.start()
        try:
            self._process.stdin.write(json.dumps(payload).encode() + b"\n")
            self._process.stdin.flush()
            line = self._read_line(time.monotonic() + timeout_s)
        except (OSError, HarnessDied) as exc:
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            detail = f"{exc}; exit status {self._process.poll()}; stderr:\n{self.stderr_tail()}"
            self.stop()
            raise HarnessDied(f"the harness (the supervisor under test) died or hung: {detail}") from None
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"the harness failed to handle the request:\n{answer['error']}")
        return answer

    def _read_line(self, deadline: float) -> bytes:
        stdout = self._process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._process.kill()
                    raise HarnessDied("no answer before the request's deadline")
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout, 1 << 20)
                if not chunk:
                    raise HarnessDied("the harness closed its output")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def info(self) -> dict:
        return self.request({"op": "info"})

    def run(
        self,
        code: str,
        inputs: dict | None = None,
        *,
        tenant: str = "default",
        probe_concurrently: bool = False,
        check_tenant: str | None = None,
        inspect_scratch: bool = False,
        files: dict[str, bytes] | None = None,
        watch_idle_worker_s: float = 0.0,
    ) -> dict:
        """Run ``code`` in the harness; the answer is described in ``Harness.run``
        (its ``files`` are base64, as ``files`` here travel)."""
        answer = self.request(
            {
                "op": "run",
                "code": code,
                "inputs": inputs or {},
                "files": {path: base64.b64encode(data).decode() for path, data in (files or {}).items()},
                "tenant": tenant,
                "probe_concurrently": probe_concurrently,
                "check_tenant": check_tenant,
                "inspect_scratch": inspect_scratch,
                "watch_idle_worker_s": watch_idle_worker_s,
            }
        )
        answer["harness_alive_after"] = self.alive()
        return answer
