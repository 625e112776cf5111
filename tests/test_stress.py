"""A small stress run of ``scripts/stress.py``: no run lost, nothing leaked.

The script runs as users run it, in a subprocess, inside a throwaway PID
namespace (its hostile workloads fork, crash, flood and exhaust memory), and
the test reads its JSON report. Timing figures in the report (throughput,
latency, loop lag) are the script's business and are not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

RUNS = 2000
STRESS_ARGS = [
    "--runs",
    str(RUNS),
    "--workers",
    "2",
    "--concurrency",
    "8",
    "--mix",
    "trivial=12,sleep=3,cpu=2,memory=1",
    "--hostile-fraction",
    "0.1",
    # Short hostile limits and a modest memory bomb keep the run well under a minute.
    "--hostile-wall-s",
    "0.5",
    "--hostile-cpu-s",
    "0.3",
    "--hostile-memory-mb",
    "128",
    "--stall-timeout-s",
    "20",
    "--no-plot",
    # Exact here: no other Sandbox of this test session runs while the script does.
    "--check-host-dirs",
]
HOSTILE_WORKLOADS = {"infinite_loop", "memory_bomb", "crash", "output_flood", "fork"}


def _throwaway_pid_namespace() -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to run hostile code in a throwaway PID namespace")
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        command.insert(1, "--map-current-user")
    return command


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("stress") / "report.json"
    command = [
        *_throwaway_pid_namespace(),
        sys.executable,
        str(REPO / "scripts" / "stress.py"),
        *STRESS_ARGS,
        "--json",
        str(path),
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert path.exists(), f"no report; exit {finished.returncode}\n{finished.stdout}\n{finished.stderr}"
    return json.loads(path.read_text())


@pytest.mark.timeout(240)
def test_every_submitted_run_ends(report: dict) -> None:
    assert report["submitted"] == RUNS
    assert report["lost_runs"] == []
    assert report["completed"] == RUNS


@pytest.mark.timeout(240)
def test_every_run_ends_as_its_workload_expects(report: dict) -> None:
    assert report["unexpected"] == 0, report["unexpected_examples"]
    assert {row["workload"] for row in report["outcomes"]} >= HOSTILE_WORKLOADS


@pytest.mark.timeout(240)
def test_nothing_is_left_behind_once_the_sandbox_closed(report: dict) -> None:
    before, after = report["resources"]["before_sandbox"], report["resources"]["after_grace"]
    assert after["processes"] == 0
    assert after["zombies"] == 0
    assert after["fds"] <= before["fds"]
    assert report["close"]["host_dirs_left"] == []
