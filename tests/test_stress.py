"""A small stress run of ``scripts/stress.py``: no run lost, nothing leaked,
the report where ``--out`` says, latency split into queue wait and execution,
and a plot whose axes and legends show the data as it is.

The script runs as users run it, in a subprocess, inside a throwaway PID
namespace (its hostile workloads fork, crash, flood and exhaust memory), and
the test reads its JSON report. Timing figures in the report (throughput,
latency, loop lag) are the script's business and are not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
    # Short hostile limits and a modest memory bomb keep the run well under a minute; the
    # CPU limit ends the infinite loops, and the wall limit is loose enough for a loaded host.
    "--hostile-wall-s",
    "2",
    "--hostile-cpu-s",
    "0.3",
    "--hostile-memory-mb",
    "128",
    "--stall-timeout-s",
    "20",
    "--no-plot",
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
def stress_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The --out directory of one stress run, and what it printed."""
    out = tmp_path_factory.mktemp("stress") / "out"
    command = [
        *_throwaway_pid_namespace(),
        sys.executable,
        str(REPO / "scripts" / "stress.py"),
        *STRESS_ARGS,
        "--out",
        str(out),
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    path = out / "stress-report.json"
    assert path.exists(), f"no report; exit {finished.returncode}\n{finished.stdout}\n{finished.stderr}"
    return out, finished.stdout


@pytest.fixture(scope="module")
def report(stress_run: tuple[Path, str]) -> dict:
    return json.loads((stress_run[0] / "stress-report.json").read_text())


@pytest.fixture(scope="module")
def stress() -> ModuleType:
    """scripts/stress.py as a module, for its option parsing and its plot."""
    spec = importlib.util.spec_from_file_location("stress_script", REPO / "scripts" / "stress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    drained = report["close"]["workers_when_drained"]
    assert drained >= 2, "the mix's tenants keep warm workers between runs"
    if report["host"]["layers"].get("mountns") == "on":
        # Workers that require their own mount namespace never get a scratch
        # directory on the host (test_supervisor checks the others' go).
        assert report["resources"]["drained"]["host_dirs"] == 0
    else:
        # The pattern really finds this Sandbox's directories (so that none
        # left after close means something): every live worker has one, and a
        # worker retired a moment ago may still have its own until it is reaped.
        assert report["resources"]["drained"]["host_dirs"] >= drained


@pytest.mark.timeout(240)
def test_the_report_goes_to_the_out_directory_only(stress_run: tuple[Path, str], report: dict) -> None:
    out, printed = stress_run
    assert sorted(p.name for p in out.iterdir()) == ["stress-report.json"]  # --no-plot: no PNG
    assert f"report written to {out / 'stress-report.json'}" in printed
    assert report["config"]["out"] == str(out)


def test_reports_go_outside_the_source_tree_by_default(stress: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/someone")
    options = stress.parse_args([])
    assert options.json == Path("/var/cache/someone/sandbox-stress/stress-report.json")
    assert options.plot == Path("/var/cache/someone/sandbox-stress/stress-plot.png")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert stress.parse_args([]).out == Path.home() / ".cache" / "sandbox-stress"
    assert not stress.parse_args([]).out.resolve().is_relative_to(REPO)


@pytest.mark.timeout(240)
def test_latency_is_split_into_queue_wait_and_execution(stress_run: tuple[Path, str], report: dict) -> None:
    for name, columns in report["latency_ms"].items():
        total, queue, execution = columns["total"], columns["queue_wait"], columns["execution"]
        if name in HOSTILE_WORKLOADS:
            # They end in errors, which carry no run statistics: total only.
            assert queue["count"] == execution["count"] == 0, name
            continue
        assert queue["count"] == execution["count"] == total["count"] > 0, name
        # Each run's queue wait and execution add up to its total, so neither part exceeds the largest total.
        assert execution["max"] <= total["max"] and queue["max"] <= total["max"], (name, columns)
    printed = stress_run[1]
    assert "queue wait" in printed and "execution" in printed
    for column, meaning in report["latency_columns"].items():
        assert f"{column}:" in printed and meaning in printed


def test_the_plot_shows_counts_as_integers_from_zero_and_keeps_legends_off_the_data(
    stress: ModuleType, report: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = {**report, "latency_timeline": [(0.1 * i, 0.002, "trivial") for i in range(50)]}
    # A constant fd count and an RSS that moves 2 MiB: the cases that used to mislead.
    report["resource_timeline"] = [
        {"t_s": i, "runs": 100 * i, "rss_bytes": (50 + 2 * (i > 5)) * 2**20, "fds": 26} for i in range(10)
    ]
    figure = stress.draw(report)
    try:
        figure.canvas.draw()
        axes = [a for a in figure.axes if a.get_legend() is not None]
        assert len(axes) == 3
        for axis in axes:
            legend = axis.get_legend().get_window_extent()
            assert not legend.overlaps(axis.get_window_extent()), axis.get_title()
        resources = axes[-1]
        assert resources.get_ylim()[0] == 0, "the RSS axis starts at 0"
        (fds,) = [a for a in figure.axes if a.get_ylabel() == "open fds"]
        assert fds.get_ylim()[0] == 0
        ticks = [t for t in fds.get_yticks() if fds.get_ylim()[0] <= t <= fds.get_ylim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(figure)
