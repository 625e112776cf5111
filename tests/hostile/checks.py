"""What must hold on the host after every hostile run, and the test-side probes.

The probes live in the test process, outside the harness's PID namespace
but in the same network namespace and file system: a TCP and a UDP listener
on 127.0.0.1, host-only directories for canaries, and random paths under
/etc, /usr and /root that a run must not be able to create.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hostile.client import UNPRIVILEGED_UID, HarnessProcess

LAG_LIMIT_S = 0.1
TIME_MARGIN_S = 1.5  # "ends near the limit": generous, the machine is shared
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
_LISTENER_GRACE_S = 0.02  # lets a connection still in flight land before we look


@dataclass
class Listeners:
    """A TCP listener and a UDP socket on 127.0.0.1 that no run may reach."""

    tcp: socket.socket
    udp: socket.socket
    accepted: list[bytes] = field(default_factory=list)
    datagrams: list[bytes] = field(default_factory=list)

    @property
    def tcp_port(self) -> int:
        return self.tcp.getsockname()[1]

    @property
    def udp_port(self) -> int:
        return self.udp.getsockname()[1]

    def poll(self) -> None:
        """Collect every connection and datagram that reached us so far."""
        time.sleep(_LISTENER_GRACE_S)
        while True:
            try:
                conn, _ = self.tcp.accept()
            except BlockingIOError:
                break
            with conn:
                conn.settimeout(0.2)
                try:
                    self.accepted.append(conn.recv(1024))
                except OSError:
                    self.accepted.append(b"")
        while True:
            try:
                self.datagrams.append(self.udp.recv(65536))
            except BlockingIOError:
                break


@contextmanager
def open_listeners() -> Iterator[Listeners]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(16)
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        yield Listeners(tcp, udp)
    finally:
        tcp.close()
        udp.close()


@contextmanager
def host_only_dir(owner_uid: int) -> Iterator[Path]:
    """A fresh 0700 directory owned by the supervisor's uid: only the host can write it."""
    directory = Path(tempfile.mkdtemp(prefix="hostile-host-only-"))
    try:
        os.chown(directory, owner_uid, owner_uid)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def supervisor_uid(harness: HarnessProcess) -> int:
    """The uid the harness's supervisor runs as: the owner of its host-only directories."""
    return UNPRIVILEGED_UID if harness.unprivileged else os.geteuid()


@dataclass
class Targets:
    """What one attack aims at; none of it may be reached."""

    canary: Path
    marker: str
    system_paths: list[Path]
    listeners: Listeners

    def inputs(self, **extra: object) -> dict:
        """The inputs every attack gets (see ``tests.hostile.attacks``), plus ``extra``."""
        return {
            "canary": str(self.canary),
            "port": self.listeners.tcp_port,
            "udp_port": self.listeners.udp_port,
            "marker": self.marker,
            "system_paths": [str(p) for p in self.system_paths],
            **extra,
        }

    def forbidden_paths(self) -> list[Path]:
        """Host paths an attack aims at; none may exist after the run."""
        return [self.canary, Path("/") / self.marker, Path("/dev/shm") / f"{self.marker}-0", *self.system_paths]


@contextmanager
def open_targets(harness: HarnessProcess) -> Iterator[Targets]:
    """A canary in a host-only directory, listeners, a unique marker and random system paths."""
    marker = f"hostile-{secrets.token_hex(6)}"
    system_paths = [Path(top) / marker for top in ("/etc", "/usr", "/root")]
    with host_only_dir(supervisor_uid(harness)) as directory, open_listeners() as listeners:
        yield Targets(directory / "canary", marker, system_paths, listeners)


def lost_workers(report: dict) -> set[int]:
    """Workers that were alive before the run and are gone after it."""
    return set(report["workers_before"]) - set(report["workers_after"])


def report_text(report: dict) -> str:
    """Every piece of the report a run could have put text into."""
    return json.dumps(
        [
            report["stdout"],
            report["stderr"],
            report["message"],
            report["attributes"],
            {name: value["repr"] for name, value in report["outputs"].items()},
        ]
    )


def output_value(report: dict, name: str) -> object:
    """The JSON value of output ``name`` of a run that must have succeeded."""
    assert report["outcome"] == "ok", f"run failed: {report['outcome']}: {report['message']}"
    assert name in report["outputs"], (
        f"no output {name!r}; outputs {sorted(report['outputs'])}, skipped {report['skipped']}"
    )
    return report["outputs"][name]["value"]


def host_problems(report: dict, harness: HarnessProcess) -> dict[str, str]:
    """Everything that must hold after every hostile run: check name -> what did not hold."""
    problems = {}
    if not report["harness_alive_after"]:
        problems["alive"] = "the supervisor died"
    if report["max_lag_s"] >= LAG_LIMIT_S:
        problems["loop"] = f"the supervisor's event loop was blocked for {report['max_lag_s'] * 1000:.0f} ms"
    if report["rlimits_changed"]:
        problems["rlimits"] = f"the supervisor's rlimits changed: {report['rlimits_changed']}"
    if report["pool_rlimits_changed"]:
        problems["pool_rlimits"] = f"the rlimits of launcher/zygote pids {report['pool_rlimits_changed']} changed"
    if report["leftovers"]:
        problems["leftovers"] = f"processes left behind: {report['leftovers']}"
    if not report["next_run"]["ok"]:
        problems["next_run"] = f"the next benign run failed: {report['next_run']['detail']}"
    if not report["host_can_fork"]:
        problems["fork"] = "the supervisor can no longer start a process"
    if report["secret_found_in"] or harness.secret in json.dumps(report):
        problems["secret"] = f"the supervisor's secret leaked into {report['secret_found_in'] or 'the report'}"
    if report["stray_files"]:
        problems["files"] = f"worker-owned files appeared on the host: {report['stray_files']}"
    return problems


def assert_host_intact(
    report: dict,
    harness: HarnessProcess,
    *,
    listeners: Listeners | None = None,
    forbidden_paths: list[Path] = (),
    ignore: frozenset[str] = frozenset(),
) -> None:
    """Assert every after-run guarantee except the checks named in ``ignore``.

    ``forbidden_paths`` must not exist on the host, and ``listeners`` must
    have received nothing.
    """
    problems = [problem for name, problem in host_problems(report, harness).items() if name not in ignore]
    if listeners is not None:
        listeners.poll()
        if listeners.accepted:
            problems.append(f"the TCP listener accepted {len(listeners.accepted)} connection(s): {listeners.accepted}")
        if listeners.datagrams:
            problems.append(f"the UDP socket received {listeners.datagrams}")
    problems += [f"{path} exists on the host" for path in forbidden_paths if os.path.lexists(path)]
    if problems:
        pytest.fail(f"outcome {report['outcome']}: {report['message'][:500]}\n" + "\n".join(problems))


def attack(
    harness: HarnessProcess,
    targets: Targets,
    code: str,
    *,
    tenant: str = "default",
    extra_inputs: dict | None = None,
    ignore: frozenset[str] = frozenset(),
    **options: object,
) -> dict:
    """Run hostile ``code`` at ``targets``, assert the host is intact, return the report."""
    report = harness.run(code, targets.inputs(**(extra_inputs or {})), tenant=tenant, **options)
    assert_host_intact(
        report, harness, listeners=targets.listeners, forbidden_paths=targets.forbidden_paths(), ignore=ignore
    )
    return report
