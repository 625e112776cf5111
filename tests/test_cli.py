"""The `sandbox` command: run, doctor, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from sandbox.policies import LAYERS
from tests.conftest import IS_ROOT, REPO


def sandbox_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def test_run_prints_the_outputs_as_json_and_the_code_output_on_stderr():
    done = sandbox_cli("run", "examples/hello.py", "--input", "n=5")
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)
    assert outputs["total"] == 30 and outputs["squares"] == [0, 1, 4, 9, 16]
    assert outputs["result"]["n"] == 5
    assert "summed 5 squares" in done.stderr


def test_run_shows_values_json_cannot_hold_as_their_repr(tmp_path):
    source = tmp_path / "node.py"
    source.write_text("s = {1}\nb = b'x'\nclass C: pass\nc = C()\nnested = {'t': (1, 2), 1: 'int key'}")
    done = sandbox_cli("run", str(source))
    outputs = json.loads(done.stdout)
    assert outputs["s"] == "{1}" and outputs["b"] == "b'x'"
    assert outputs["c"].startswith("<Opaque __main__.C")
    assert outputs["nested"] == "{'t': (1, 2), 1: 'int key'}"


def test_run_failure_exits_non_zero_naming_the_error_type(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("print('partial')\nraise KeyError('k')")
    done = sandbox_cli("run", str(source))
    assert done.returncode == 1
    assert "CodeError: KeyError: 'k'" in done.stderr and "partial" in done.stderr
    assert done.stdout == ""


def test_run_with_a_policy_file_and_tenant(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[tenants.tight]\nwall_time_s = 0.5\n")
    source = tmp_path / "spin.py"
    source.write_text("while True:\n    pass")
    done = sandbox_cli("run", str(source), "--policy", str(policy), "--tenant", "tight")
    assert done.returncode == 1 and "TimeLimitExceeded" in done.stderr


def test_usage_errors_exit_2(tmp_path):
    assert sandbox_cli("run", "examples/hello.py", "--input", "n").returncode == 2
    bad_json = sandbox_cli("run", "examples/hello.py", "--input", "n=five")
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
    assert sandbox_cli("run", str(tmp_path / "missing.py")).returncode == 2


def test_doctor_reports_every_layer():
    done = sandbox_cli("doctor", timeout=120)
    assert done.returncode == 0, done.stderr
    for layer in LAYERS:
        assert layer in done.stdout
    if IS_ROOT:
        assert "== this host (root)" in done.stdout and "== unprivileged (uid 65534)" in done.stdout
        unprivileged = done.stdout.split("== unprivileged")[1]
        assert "cgroup    off:" in unprivileged and "seccomp   on" in unprivileged


def test_doctor_json():
    done = sandbox_cli("doctor", "--json", timeout=120)
    report = json.loads(done.stdout)
    assert report["error"] is None
    assert set(report["layers"]) == set(LAYERS)
    assert report["layers"]["seccomp"] == "on"
    assert all(
        report["default_policy"][layer] == "required" for layer, state in report["layers"].items() if state == "on"
    )
