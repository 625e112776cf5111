"""Errors say what to fix, in the project's words: each message asserted by its text."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sandbox import CodeError, Policy, PolicyFileError, PolicyViolation, Sandbox, SandboxError
from sandbox.outcome import cpu_exceeded
from sandbox.policies import load_policies
from sandbox.profile import native_thread_env
from tests.conftest import REPO, quick_policy
from tests.test_cli import sandbox_cli

# --- the command line ---------------------------------------------------------------------------------


def test_an_unknown_tenant_without_a_policy_file_lists_the_tenants_and_says_how_to_load_more():
    done = sandbox_cli("run", "examples/hello.py", "--tenant", "free")
    assert done.returncode == 2
    assert (
        "unknown tenant 'free': without --policy there is only the built-in default: 'default'; "
        "--policy FILE loads more tenants" in done.stderr
    )
    assert "None" not in done.stderr


def test_an_unknown_tenant_with_a_policy_file_lists_the_file_and_its_tenants(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[tenants.paid]\n[tenants.trial]\n")
    done = sandbox_cli("run", "examples/hello.py", "--policy", str(policy), "--tenant", "free")
    assert done.returncode == 2
    assert f"unknown tenant 'free': {policy} defines 'default', 'paid', 'trial'" in done.stderr


def test_an_argument_error_prints_the_usage_of_the_subcommand_not_the_top_level_one():
    done = sandbox_cli("run", "examples/hello.py", "--input", "n")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: sandbox run ")
    assert "sandbox run: error: --input 'n': expected NAME=JSON" in done.stderr
    check = sandbox_cli("policy", "check")
    assert check.returncode == 2 and check.stderr.startswith("usage: sandbox policy check ")


def test_a_traceback_from_sandbox_run_names_the_file_and_its_line(tmp_path):
    source = tmp_path / "node.py"
    source.write_text("x = 1\ny = 2\nraise ValueError('bad row')\n")
    done = sandbox_cli("run", str(source))
    assert done.returncode == 1
    assert f'File "{source}", line 3, in <module>' in done.stderr
    assert "raise ValueError('bad row')" in done.stderr
    assert "<code>" not in done.stderr


def test_ctrl_c_exits_130_with_one_line_and_leaves_no_worker(tmp_path):
    source = tmp_path / "slow.py"
    source.write_text("print('started', flush=True)\nawait asyncio.sleep(60)\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "run", str(source)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_descendants(process.pid)) < 4:  # launcher, zygote, init, worker
        time.sleep(0.05)
    assert len(_descendants(process.pid)) >= 4, "the worker never started"
    time.sleep(0.5)  # the run is under way
    workers = _descendants(process.pid)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "sandbox: interrupted"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stdout == ""
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


# --- policy files ---------------------------------------------------------------------------------------


def test_a_typo_names_the_file_the_tenant_the_field_and_the_field_it_meant(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[tenants.free]\nmemroy_mb = 512\n")
    with pytest.raises(PolicyFileError) as caught:
        load_policies(policy)
    assert caught.value.problems == [f"{policy}: tenant 'free': unknown field 'memroy_mb'; did you mean 'memory_mb'?"]
    assert "Extra inputs are not permitted" not in str(caught.value)


def test_a_typo_in_base_is_reported_once_not_once_per_tenant(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[base]\nmemroy_mb = 512\n[tenants.a]\n[tenants.b]\n[tenants.c]\nwall_time_s = -1\n")
    with pytest.raises(PolicyFileError) as caught:
        load_policies(policy)
    problems = caught.value.problems
    assert problems.count(f"{policy}: [base]: unknown field 'memroy_mb'; did you mean 'memory_mb'?") == 1
    assert sum("memroy_mb" in problem for problem in problems) == 1
    assert any(problem.startswith(f"{policy}: tenant 'c': wall_time_s: ") for problem in problems)


def test_an_unknown_field_with_no_near_name_points_at_the_documented_fields(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[tenants.free]\nbanana = 1\n")
    with pytest.raises(
        PolicyFileError, match=re.escape("unknown field 'banana'; policies/default.toml lists every field")
    ):
        load_policies(policy)


# --- inside a run -----------------------------------------------------------------------------------------


async def test_a_blocked_import_names_allowed_modules_and_the_entry_to_add():
    async with Sandbox(quick_policy(), workers=1) as sb:
        with pytest.raises(PolicyViolation) as caught:
            await sb.run("import aiohttp")
        assert (
            "import of 'aiohttp' is not allowed by the policy of tenant 'default'; "
            'to allow it, add "aiohttp.*" to allowed_modules' in str(caught.value)
        )
        with pytest.raises(PolicyViolation) as denied:
            await sb.run("import os.path")
        assert 'denied_modules has "os", and a deny entry wins over allowed_modules' in str(denied.value)


async def test_the_blocked_import_the_code_sees_says_the_same():
    async with Sandbox(quick_policy(), workers=1) as sb:
        r = await sb.run("try:\n    import aiohttp\nexcept ImportError as e:\n    seen = str(e)\n")
        assert r.outputs["seen"].endswith('to allow it, add "aiohttp.*" to allowed_modules')


async def test_a_socket_without_network_fails_saying_the_policy_allows_none_and_what_grants_it():
    policy = quick_policy(allowed_modules=[*Policy().allowed_modules, "socket"], denied_modules=[])
    async with Sandbox(policy, workers=1) as sb:
        r = await sb.run(
            "import socket\n"
            "try:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\nexcept OSError as e:\n"
            "    kind, errno, text = type(e).__name__, e.errno, e.strerror\n"
            "try:\n    await asyncio.open_connection('127.0.0.1', 9)\nexcept OSError as e:\n    via_asyncio = str(e)\n"
            "local = socket.socketpair()[0].family.name\n"
        )
    outputs = r.outputs
    assert outputs["kind"] == "PermissionError" and outputs["errno"] == 13
    assert outputs["text"] == (
        "network access is not allowed by the policy of tenant 'default'; "
        'grant it with egress = ["HOST:PORT", ...] (or network = true) in its policy'
    )
    assert "Address family not supported" not in outputs["via_asyncio"]
    assert "not allowed by the policy of tenant 'default'" in outputs["via_asyncio"]
    assert outputs["local"] == "AF_UNIX"  # sockets the policy allows are untouched


def test_native_thread_pools_are_sized_to_the_thread_budget():
    assert native_thread_env(1) == dict.fromkeys(
        ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"], "1"
    )
    assert set(native_thread_env(4096).values()) == {str(os.cpu_count())}


async def test_numpy_with_one_thread_runs_instead_of_spinning():
    pytest.importorskip("numpy")
    policy = quick_policy(max_threads=1, allowed_modules=["numpy.*", "os"], denied_modules=[])
    async with Sandbox(policy, workers=1) as sb:
        r = await sb.run(
            "import os\nimport numpy as np\n_a = np.ones((400, 400))\ntotal = float((_a @ _a).sum())\n"
            "threads = os.environ['OPENBLAS_NUM_THREADS']\n"
        )
    assert r.outputs == {"total": 400.0**3, "threads": "1"}
    assert "pthread_create failed" not in r.stderr


def test_a_native_pool_that_still_hits_the_thread_limit_fails_naming_max_threads():
    # What OpenBLAS writes before it spins, when its threads cannot start.
    stderr = (
        "OpenBLAS blas_thread_init: pthread_create failed for thread 1 of 2: Resource temporarily unavailable\n"
        "OpenBLAS blas_thread_init: ensure that your address space and process count limits are big enough\n"
    )
    error = cpu_exceeded(Policy(max_threads=1, cpu_time_s=2), stdout="", stderr=stderr)
    assert str(error) == (
        "run exceeded its CPU-time limit of 2 s and was stopped; a native thread pool could not start its threads "
        "(the policy allows max_threads = 1 threads per worker; raise max_threads, or start fewer threads)"
    )
    assert error.stderr == stderr
    assert str(cpu_exceeded(Policy(cpu_time_s=2), stdout="", stderr="")) == (
        "run exceeded its CPU-time limit of 2 s and was stopped"
    )


async def test_python_threads_past_the_budget_fail_naming_max_threads():
    policy = quick_policy(max_threads=2, allowed_modules=["threading", "time"], denied_modules=[])
    async with Sandbox(policy, workers=1) as sb:
        with pytest.raises(CodeError) as caught:
            await sb.run(
                "import threading, time\n"
                "for _ in range(8):\n    threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n"
            )
    assert caught.value.type_name == "RuntimeError"
    assert "can't start new thread (the policy allows max_threads = 2 threads per worker" in str(caught.value)


async def test_an_unknown_tenant_in_the_api_lists_the_tenants_served():
    async with Sandbox(tenants={"paid": quick_policy()}, workers=1) as sb:
        with pytest.raises(SandboxError) as caught:
            await sb.run("x = 1", tenant="free")
    assert str(caught.value) == (
        "unknown tenant 'free': this sandbox serves 'default', 'paid'; define it in Sandbox(tenants=...)"
    )


async def test_the_api_names_the_file_in_tracebacks():
    async with Sandbox(quick_policy(), workers=1) as sb:
        with pytest.raises(CodeError) as caught:
            await sb.run("x = 1\n1 / 0\n", filename="report.py")
    assert 'File "report.py", line 2, in <module>' in caught.value.traceback
    assert "1 / 0" in caught.value.traceback
