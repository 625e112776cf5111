"""The supervisor under hostile-code test: one Sandbox, driven over JSON lines.

It is meant to run only inside a throwaway PID namespace (and, as root, a
pids cgroup), started by ``tests.hostile.client`` as::

    unshare --pid --fork --kill-child --mount-proc python -I harness.py SOURCE_ROOT CONFIG_JSON

so that a sandbox that is broken can kill or exhaust nothing outside it. As
pid 1 of that namespace the process only forks the harness proper and waits
for it; the harness is an ordinary process, like a real supervisor.

``SOURCE_ROOT`` is put first on ``sys.path`` (the ``sandbox`` package is
imported from there). ``CONFIG_JSON`` is
``{"tenants": {name: {policy field: value}}, "workers": n}``.

Each line on stdin is one JSON request and gets one JSON line on stdout:

* ``{"op": "info"}``: the harness's uid and the Sandbox's layers;
* ``{"op": "run", "code": ..., "inputs": {...}, "files": {path: base64}, "tenant": ..., "probe_concurrently": bool,
  "check_tenant": name or null, "inspect_scratch": bool}``: one run, then every check of the host; see
  :meth:`Harness.run` for the fields of the answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import stat
import sys
import time
import traceback

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])  # SOURCE_ROOT: the packages under test come from there

import psutil
import uvloop

from sandbox import Opaque, Result, Sandbox, SandboxError, leftovers, procfs
from sandbox.policies import Policy
from sandbox.profile import UID_BASE
from sandbox.worker import State

BENIGN_CODE = (
    "with open('benign.txt', 'w') as handle:\n"
    "    handle.write('6')\n"
    "with open('benign.txt') as handle:\n"
    "    value = int(handle.read()) * 7\n"
)
BENIGN_OUTPUTS = {"value": 42}
TENANT_CHECK_CODE = "import json\ndumped = json.dumps({'a': 1})\n"
# Walks everything a run can write. Code may not import os, so this reaches it
# the way an attacker would; it is the test's own code, run as the tenant.
SCRATCH_INSPECTION_CODE = """
import random
_os = random._os
largest = 0
for _top in ("/work", "/tmp", "/dev/shm"):
    _device = _os.lstat(_top).st_dev
    for _root, _dirs, _files in _os.walk(_top):
        # Read-only binds (the interpreter's files, should they live under one
        # of these paths) are other devices, where no run can write.
        _dirs[:] = [_d for _d in _dirs if _os.lstat(_os.path.join(_root, _d)).st_dev == _device]
        for _name in _files:
            _st = _os.lstat(_os.path.join(_root, _name))
            largest = max(largest, _st.st_size, _st.st_blocks * 512)
"""
SECRET_VARIABLE = "SANDBOX_TEST_SECRET"
_SETTLE_S = 2.0  # how long the processes of a finished run may take to disappear
_PROBE_DELAY_S = 0.2
_LAG_PERIOD_S = 0.005
_RLIMITS = sorted(name for name in dir(resource) if name.startswith("RLIMIT_"))


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    if os.getpid() == 1:
        _become_init()
    # Answers go to a private copy of stdout; anything printed by accident goes to stderr.
    answers = os.dup(1)
    os.dup2(2, 1)
    uvloop.run(_serve(config, answers))


def _become_init() -> None:
    """Fork the harness and reap every orphan until it exits; return in the child.

    Exits as the harness did, with 128 + N when a signal N killed it.
    """
    harness = os.fork()
    if harness == 0:
        return
    while True:
        pid, status = os.wait()
        if pid == harness:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


async def _serve(config: dict, answers: int) -> None:
    tenants = {name: Policy(**overrides) for name, overrides in config["tenants"].items()}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))
    async with Sandbox(tenants=tenants, workers=config["workers"]) as sandbox:
        harness = Harness(sandbox)
        while line := await reader.readline():
            request = json.loads(line)
            try:
                answer = await harness.handle(request)
            except Exception:
                answer = {"error": traceback.format_exc()}
            _write_line(answers, answer)
        harness.lag.stop()


def _write_line(fd: int, answer: dict) -> None:
    view = memoryview(json.dumps(answer).encode() + b"\n")
    while view:
        view = view[os.write(fd, view) :]


class LagMonitor:
    """The worst delay of the event loop in waking a task that sleeps 5 ms at a time."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def reset(self) -> None:
        self.worst = 0.0

    def stop(self) -> None:
        self._task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(_LAG_PERIOD_S)
            self.worst = max(self.worst, loop.time() - start - _LAG_PERIOD_S)


class Harness:
    """Runs requests against one Sandbox and checks the host around each run."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.lag = LagMonitor()
        self.rlimits_at_start = _own_rlimits()
        self.seen_pairs: set[int] = set()  # init and worker pids of every worker seen live
        self.secret = os.environ.get(SECRET_VARIABLE, "").encode()

    async def handle(self, request: dict) -> dict:
        if request["op"] == "info":
            return self.info()
        if request["op"] == "run":
            return await self.run(request)
        raise ValueError(f"unknown op {request['op']!r}")

    def info(self) -> dict:
        return {"uid": os.getuid(), "layers": self.sandbox.host.layers}

    async def run(self, request: dict) -> dict:
        """One hostile run and every check of the host after it.

        The answer holds the run's ``outcome`` ("ok" or the error class),
        ``message``, ``attributes`` (the error's plain fields), ``stdout``,
        ``stderr``, ``outputs`` (name -> {repr, value when JSON can hold it,
        opaque, type, reason}), ``skipped``, ``worker_pid`` (when it returned)
        and ``elapsed_s``; then
        ``max_lag_s`` over the run and its settling, ``rlimits_changed`` (the
        supervisor's own), ``pool_rlimits_changed`` (launcher and zygote),
        ``leftovers`` (processes that are neither the harness nor the pool),
        ``workers_before``/``workers_after``, ``stray_files`` (worker-owned
        files on the host), ``secret_found_in``, ``rss_growth_bytes``,
        ``host_can_fork``, ``next_run``, and, when asked, ``probe`` (a benign
        run submitted while this one was running) and ``tenant_check``
        (what another tenant's ``json.dumps`` returns afterwards) and
        ``scratch_largest`` (the largest file a next run sees where runs write),
        and ``worker_idle_cpu_s``: with ``watch_idle_worker_s``, the CPU the
        run's worker used after the run until it was gone, None if it
        outlived that many seconds.
        """
        loop = asyncio.get_running_loop()
        tenant = request.get("tenant", "default")
        await self.sandbox._pool.wait_started()
        workers_before = self._worker_pids()
        self._live_pairs()
        pool_limits_before = self._pool_rlimits()
        rss_before = _own_rss()
        started_wall = time.time()
        self.lag.reset()
        start = loop.time()
        files = {path: base64.b64decode(data) for path, data in (request.get("files") or {}).items()}
        task = loop.create_task(
            self.sandbox.run(request["code"], request.get("inputs") or {}, tenant=tenant, files=files)
        )
        probe = None
        if request.get("probe_concurrently"):
            await asyncio.sleep(_PROBE_DELAY_S)
            probe = await self._benign(tenant)
        opaque_data: dict[str, bytes] = {}
        try:
            result = await task
        except SandboxError as exc:
            answer = _describe_error(exc)
        else:
            answer = _describe_result(result)
            opaque_data = {name: v.data for name, v in result.outputs.items() if isinstance(v, Opaque)}
        answer["elapsed_s"] = loop.time() - start
        if request.get("watch_idle_worker_s") and "worker_pid" in answer:
            answer["worker_idle_cpu_s"] = await _cpu_until_gone(answer["worker_pid"], request["watch_idle_worker_s"])
        answer["leftovers"] = await self._leftovers()
        answer["max_lag_s"] = self.lag.worst
        answer["workers_before"] = workers_before
        answer["workers_after"] = self._worker_pids()
        answer["rlimits_changed"] = sorted(
            name for name, value in _own_rlimits().items() if value != self.rlimits_at_start[name]
        )
        pool_limits_after = self._pool_rlimits()
        answer["pool_rlimits_changed"] = sorted(
            pid
            for pid, text in pool_limits_before.items()
            if pid in pool_limits_after and pool_limits_after[pid] != text
        )
        answer["rss_growth_bytes"] = _own_rss() - rss_before
        answer["stray_files"] = _stray_files(started_wall, exclude=leftovers.lock_path(leftovers.owner_tag()))
        answer["secret_found_in"] = self._secret_places(answer, opaque_data)
        answer["probe"] = probe
        answer["host_can_fork"] = await _can_fork()
        answer["next_run"] = await self._benign(tenant)
        if request.get("check_tenant"):
            answer["tenant_check"] = await self._tenant_check(request["check_tenant"])
        if request.get("inspect_scratch"):
            answer["scratch_largest"] = await self._inspect_scratch(tenant)
        return answer

    async def _benign(self, tenant: str) -> dict:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            result = await self.sandbox.run(BENIGN_CODE, tenant=tenant)
        except SandboxError as exc:
            return {"ok": False, "detail": f"{type(exc).__name__}: {exc}", "elapsed_s": loop.time() - start}
        return {
            "ok": result.outputs == BENIGN_OUTPUTS,
            "detail": repr(result.outputs),
            "elapsed_s": loop.time() - start,
        }

    async def _tenant_check(self, tenant: str) -> dict:
        try:
            result = await self.sandbox.run(TENANT_CHECK_CODE, tenant=tenant)
        except SandboxError as exc:
            return {"outcome": type(exc).__name__, "detail": str(exc)}
        return {"outcome": "ok", "dumped": result.outputs.get("dumped")}

    async def _inspect_scratch(self, tenant: str) -> int | str:
        """The largest file a run of ``tenant`` can now see where runs can write.

        The pool hands out its most recently used worker first, so this
        runs in the worker that just ran, unless that one was replaced.
        """
        try:
            result = await self.sandbox.run(SCRATCH_INSPECTION_CODE, tenant=tenant)
        except SandboxError as exc:
            return f"{type(exc).__name__}: {exc}"
        return result.outputs["largest"]

    # --- the processes of the namespace -----------------------------------------

    def _worker_pids(self) -> list[int]:
        return sorted(w.pid for w in self.sandbox._pool.workers if w.state is not State.DEAD and w.pid)

    def _live_pairs(self) -> set[int]:
        """Init and worker pids of every live worker, from the pool's own pidfds (read only)."""
        pids = set()
        for worker in self.sandbox._pool.workers:
            if worker.state is not State.DEAD:
                pids.update(procfs.pidfd_pid(fd) for fd in worker._pidfds)
        self.seen_pairs |= pids
        return pids

    def _unexpected_pids(self) -> set[int]:
        """Processes of the namespace that are neither the harness nor the pool.

        Expected: pid 1, the harness, the launcher (the zygote handle's
        process), the zygote (the launcher's child), the zygote's init
        forker, and the (init, worker) pairs of live workers and of the
        standbys forked ahead of need: each worker is the zygote's child,
        its init the init forker's. Everything a run starts lives inside
        its worker's PID namespace, below such a pair, so any deeper process
        is left over; so is a pair that served as a worker once and is no
        longer live.
        """
        processes = {p.pid: (p.info["ppid"], p.info["name"]) for p in psutil.process_iter(["ppid", "name"])}
        parents = {pid: ppid for pid, (ppid, _) in processes.items()}
        launcher = self.sandbox._pool._zygote._process.pid
        zygotes = {pid for pid, ppid in parents.items() if ppid == launcher}
        forkers = {pid for pid, (ppid, name) in processes.items() if ppid in zygotes and name == "sandbox-inits"}
        live = self._live_pairs()
        retired = self.seen_pairs - live
        skeleton = {1, os.getpid(), launcher} | zygotes | forkers
        pair_parents = zygotes | forkers
        return {
            pid for pid, ppid in parents.items() if pid not in skeleton and (ppid not in pair_parents or pid in retired)
        }

    async def _leftovers(self) -> list[dict]:
        """Processes that belong neither to the harness nor to the pool, after a settle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SETTLE_S
        while True:
            await self.sandbox._pool.wait_started()
            extra = self._unexpected_pids()
            if not extra or loop.time() > deadline:
                return [d for d in map(_describe_process, sorted(extra)) if d is not None]
            await asyncio.sleep(0.05)

    def _pool_rlimits(self) -> dict[int, str]:
        """The rlimits of the launcher and the zygote, as /proc shows them."""
        launcher = self.sandbox._pool._zygote._process.pid
        try:
            pids = [launcher, *(child.pid for child in psutil.Process(launcher).children())]
        except psutil.NoSuchProcess:
            return {}
        limits = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/limits") as f:
                    limits[pid] = f.read()
            except OSError:
                continue
        return limits

    # --- the host's files and the secret -----------------------------------------

    def _secret_places(self, answer: dict, opaque_data: dict[str, bytes]) -> list[str]:
        """Every part of the answer (and every Opaque's bytes) that holds the secret."""
        if not self.secret:
            return []
        text = self.secret.decode()
        places = [field for field in ("stdout", "stderr", "message") if text in answer[field]]
        if text in json.dumps(answer["attributes"]):
            places.append("attributes")
        places += [
            f"outputs[{name!r}]"
            for name, value in answer["outputs"].items()
            if text in value["repr"] or self.secret in opaque_data.get(name, b"")
        ]
        return places


def _stray_files(since: float, exclude: str) -> list[dict]:
    """Regular files owned by a worker identity that appeared on the host since ``since``,
    but ``exclude``: the supervisor's own lock (its uid is the workers' when unprivileged).

    Looks where a worker that escaped its mount namespace would land: the
    host's /tmp, /var/tmp and /dev/shm, and the zygote's per-worker host
    scratch directories (used only when there is no mount namespace).
    """

    def is_worker(uid: int) -> bool:
        return uid >= UID_BASE if os.getuid() == 0 else uid == os.getuid()

    found = []
    candidates: list[str] = []
    for top in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("sandbox-w") and entry.is_dir(follow_symlinks=False):
                for root, _, files in os.walk(entry.path):
                    candidates.extend(os.path.join(root, name) for name in files)
            else:
                candidates.append(entry.path)
    for path in candidates:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime >= since - 1 and is_worker(st.st_uid) and path != exclude:
            found.append({"path": path, "size": st.st_size, "uid": st.st_uid})
    return found


def _describe_result(result: Result) -> dict:
    return {
        "outcome": "ok",
        "message": "",
        "attributes": {},
        "stdout": result.stdout,
        "stderr": result.stderr,
        "outputs": {name: _describe_value(value) for name, value in result.outputs.items()},
        "skipped": dict(result.skipped),
        "files": {path: base64.b64encode(data).decode() for path, data in result.files.items()},
        "skipped_files": dict(result.skipped_files),
        "worker_pid": result.stats.worker_pid,
    }


def _describe_error(exc: SandboxError) -> dict:
    attributes = {
        key: value
        for key, value in vars(exc).items()
        if key not in ("stdout", "stderr") and isinstance(value, (str, int, float, bool, type(None)))
    }
    return {
        "outcome": type(exc).__name__,
        "message": str(exc),
        "attributes": attributes,
        "stdout": exc.stdout,
        "stderr": exc.stderr,
        "outputs": {},
        "skipped": {},
        "files": {},
        "skipped_files": {},
    }


def _describe_value(value: object) -> dict:
    """A JSON-safe account of one output: ``value`` only when JSON holds it exactly."""
    if isinstance(value, Opaque):
        return {"opaque": True, "type": value.type_name, "reason": value.reason, "repr": repr(value), "value": None}
    try:
        text = repr(value)
    except ValueError as exc:  # e.g. an int with more digits than str() allows
        text = f"<{type(value).__name__}: {exc}>"
    try:
        plain = json.loads(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        plain = None
    return {
        "opaque": False,
        "type": type(value).__name__,
        "reason": "",
        "repr": text,
        "value": plain if plain is not None and plain == value else None,  # arrays compare elementwise
    }


def _describe_process(pid: int) -> dict | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            description = {
                "pid": pid,
                "ppid": process.ppid(),
                "name": process.name(),
                "status": process.status(),
                "uids": list(process.uids()),
            }
        try:
            description["cmdline"] = process.cmdline()
        except psutil.AccessDenied:
            description["cmdline"] = None
        return description
    except psutil.NoSuchProcess:
        return None


async def _cpu_until_gone(pid: int, within_s: float) -> float | None:
    """CPU seconds ``pid`` used from now until it was gone; None if it outlived ``within_s``."""
    try:
        process = psutil.Process(pid)
        start = last = sum(process.cpu_times()[:2])
    except psutil.NoSuchProcess:
        return 0.0  # gone before the first look
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            last = sum(process.cpu_times()[:2])
            if process.status() == psutil.STATUS_ZOMBIE:
                return last - start
        except psutil.NoSuchProcess:
            return last - start
        await asyncio.sleep(0.01)
    return None


def _own_rlimits() -> dict[str, tuple[int, int]]:
    return {name: resource.getrlimit(getattr(resource, name)) for name in _RLIMITS}


def _own_rss() -> int:
    return psutil.Process().memory_info().rss


async def _can_fork() -> bool:
    process = await asyncio.create_subprocess_exec(
        "/bin/true", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
    )
    return await process.wait() == 0


if __name__ == "__main__":
    main(sys.argv[1:])
