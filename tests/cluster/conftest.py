"""Run the cluster tests inside a network namespace of their own, and report each one here.

Ray probes the cloud metadata address and its usage-stats endpoint when it
starts. So no Ray process may run in the test run's own namespace: these
tests run in a child pytest started under ``unshare --net`` (which then
brings loopback up, so loopback is the only interface), where every Ray process is
bound to 127.0.0.1 and usage stats are off. A namespace is per thread in
Linux, so entering one from this multi-threaded pytest would move one
thread only; a child process moves everything it starts.

In the outer run each cluster test is replaced by a relay item with the same
node id. The first one to run starts the inner pytest for all of them; each
then waits for its own test's reports (written by the inner run as JSON
lines) and ends the way the inner test ended, with its failure text. So the
outer run shows real per-test results, and a test that never reported (the
inner run crashed) fails with the inner run's output.

To run them by hand, ``python -m pytest tests/cluster`` is enough (it does
the same); the inner command is in :meth:`InnerRun.start`. The same helpers start a
local cluster for scripts (``sandbox.cluster.offline``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sandbox.cluster.offline import loopback_only, only_loopback, start_local_cluster, stop_local_cluster

INSIDE = os.environ.get("SANDBOX_CLUSTER_NETNS") == "1"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_REPORTS = "SANDBOX_CLUSTER_REPORTS"
_INNER_START_S = 600  # the whole inner run; each relay item has its own pytest timeout


# --- inside the namespace ----------------------------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(_REPORTS)
    if not INSIDE or path is None:
        return
    entry = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "text": report.longreprtext,
        "duration": report.duration,
    }
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["text"] = str(report.longrepr[2])
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


# --- the outer run -----------------------------------------------------------------------


class InnerRun:
    """The one child pytest that runs every selected cluster test in the namespace."""

    def __init__(self, nodeids: list[str], timeout: float) -> None:
        self.nodeids = nodeids
        self.timeout = timeout
        self.directory = Path(tempfile.mkdtemp(prefix="sandbox-cluster-tests-"))
        self.reports = self.directory / "reports.jsonl"
        self.output = self.directory / "output.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: dict[str, list[dict[str, object]]] = {}
        self.offset = 0

    def start(self) -> None:
        pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.nodeids]
        if self.timeout:
            pytest_command.append(f"--timeout={self.timeout}")
        env = {**os.environ, "SANDBOX_CLUSTER_NETNS": "1", _REPORTS: str(self.reports), "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                loopback_only(pytest_command), cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
            )

    def wait_for(self, nodeid: str) -> list[dict[str, object]]:
        """Every report of ``nodeid`` once its teardown is in, or what there is when the run ended."""
        if self.process is None:
            self.start()
        assert self.process is not None
        deadline = time.monotonic() + _INNER_START_S
        while time.monotonic() < deadline:
            self._read()
            phases = self.seen.get(nodeid, [])
            if any(entry["when"] == "teardown" for entry in phases):
                return phases
            if self.process.poll() is not None:
                self._read()
                return self.seen.get(nodeid, [])
            time.sleep(0.05)
        return self.seen.get(nodeid, [])

    def _read(self) -> None:
        if not self.reports.exists():
            return
        with open(self.reports) as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith("\n"):
                    break
                self.offset += len(line)
                entry = json.loads(line)
                self.seen.setdefault(entry["nodeid"], []).append(entry)

    def tail(self) -> str:
        try:
            return self.output.read_text(errors="replace")[-6000:]
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


class RelayedFailure(Exception):
    pass


class RelayedItem(pytest.Item):
    """Stands for one cluster test; runs nothing itself, reports how the inner one ended."""

    def __init__(self, *, inner: InnerRun, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.inner = inner

    def runtest(self) -> None:
        phases = self.inner.wait_for(self.nodeid)
        if not phases:
            raise RelayedFailure(
                f"the cluster test run ended without running this test; its output:\n{self.inner.tail()}"
            )
        failed = [entry for entry in phases if entry["outcome"] == "failed"]
        if failed:
            raise RelayedFailure("\n".join(f"[inner {entry['when']}]\n{entry['text']}" for entry in failed))
        skipped = [entry for entry in phases if entry["outcome"] == "skipped"]
        if skipped:
            pytest.skip(str(skipped[0]["text"]))
        if not any(entry["when"] == "call" and entry["outcome"] == "passed" for entry in phases):
            raise RelayedFailure(f"no passing call was reported: {phases}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: object = None) -> str:
        if isinstance(excinfo.value, RelayedFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: relay only what runs
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if INSIDE:
        return
    ours = [item for item in items if HERE in item.path.parents]
    if not ours:
        return
    inner = InnerRun([item.nodeid for item in ours], config.getoption("timeout", 0) or 0)
    config.add_cleanup(inner.stop)
    relayed = {}
    for item in ours:
        relay = RelayedItem.from_parent(item.parent, name=item.name, inner=inner)
        relay.add_marker(pytest.mark.timeout(_INNER_START_S))
        relayed[item] = relay
    items[:] = [relayed.get(item, item) for item in items]


# --- fixtures of the inner run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node plus one added node on this machine, inside the namespace only."""
    assert INSIDE and only_loopback(), "Ray may start only in a network namespace with nothing but loopback"
    cluster = start_local_cluster(nodes=2)
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)
