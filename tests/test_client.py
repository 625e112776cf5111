"""``sandbox.client``: the same cases through a real ``sandbox serve`` and through an in-process Sandbox."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sandbox import (
    CodeError,
    InputError,
    Opaque,
    PolicyViolation,
    QuotaExceeded,
    Result,
    Sandbox,
    SandboxError,
    TimeLimitExceeded,
    WorkflowBuilder,
    WorkflowError,
    load_policies,
)
from sandbox.client import Client, ServiceError, SyncClient
from tests.serving import Server, environment_with, running_server

pytestmark = pytest.mark.timeout(180)
module_loop = pytest.mark.asyncio(loop_scope="module")  # the module-scoped Sandbox and Client live on it

SUCCESSES = {
    "scalars": ("y = x * 2\nname = 'n' + str(y)\nnothing = None\nratio = 0.5", {"x": 21}),
    "containers": ("t = (1, [2, (3,)])\ns = {1, 2}\nf = frozenset({'a'})\nd = {1: 'one', (2, 3): b'x'}", None),
    "bytes": ("b = data[::-1]\nba = bytearray(data)", {"data": b"\x00\x01\xff"}),
    "numbers": (
        "import decimal, fractions\nd = decimal.Decimal('1.10')\nq = fractions.Fraction(1, 3)\nc = 2 + 3j\n"
        "nan = float('nan')\ninf = float('-inf')",
        None,
    ),
    "times": (
        "import datetime, uuid\nwhen = datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)\n"
        "day = datetime.date(2024, 1, 2)\nclock = datetime.time(1, 2, 3)\n"
        "span = datetime.timedelta(days=-1, seconds=5)\n"
        "u = uuid.UUID(int=7)\nzone = datetime.timezone(datetime.timedelta(hours=2))",
        None,
    ),
    "dollar keys": ("odd = {'$type': 'bytes', 'base64': 'AA=='}", None),
    "output and skipped": ("import math\nprint('out')\ndef f(): pass\nx = math.pi", None),
}
FAILURES = {
    "code error": ("print('before')\nraise ValueError('bad')", None),
    "time limit": ("while True: pass", None),
    "denied import": ("import socket", None),
    "bad input name": ("x = 1", {"not a name": 1}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("client")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local(server: Server) -> AsyncIterator[Sandbox]:
    policy_file = Path(server.process.args[server.process.args.index("--policy") + 1])
    async with Sandbox(tenants=load_policies(policy_file), workers=2) as sandbox:
        yield sandbox


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(server: Server) -> AsyncIterator[Client]:
    async with Client(server.url, server.keys["default"]) as client:
        yield client


def comparable(result: Result) -> tuple:
    """What must match between local and remote (not the worker pid or the timings)."""
    outputs = {name: _comparable(value) for name, value in result.outputs.items()}
    return outputs, result.stdout, result.stderr, result.skipped, result.stats.tenant


def _comparable(value: object) -> object:
    if isinstance(value, Opaque):
        return ("opaque", value.type_name, value.reason)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


@module_loop
@pytest.mark.parametrize("case", SUCCESSES)
async def test_a_run_returns_the_same_result_locally_and_remotely(local: Sandbox, remote: Client, case: str) -> None:
    code, inputs = SUCCESSES[case]
    here = await local.run(code, inputs)
    there = await remote.run(code, inputs)
    assert isinstance(there, Result)
    assert comparable(there) == comparable(here)
    for name, value in here.outputs.items():
        assert type(there.outputs[name]) is type(value), name


@module_loop
@pytest.mark.parametrize("case", FAILURES)
async def test_a_failure_raises_the_same_error_locally_and_remotely(local: Sandbox, remote: Client, case: str) -> None:
    code, inputs = FAILURES[case]
    with pytest.raises(SandboxError) as here:
        await local.run(code, inputs, timeout=0.5)
    with pytest.raises(SandboxError) as there:
        await remote.run(code, inputs, timeout=0.5)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)
    assert (there.value.stdout, there.value.stderr) == (here.value.stdout, here.value.stderr)
    ignored = {"limit_s"} if isinstance(here.value, TimeLimitExceeded) else set()
    assert {k: v for k, v in vars(there.value).items() if k not in ignored} == {
        k: v for k, v in vars(here.value).items() if k not in ignored
    }


@module_loop
async def test_error_attributes_survive_the_trip(remote: Client) -> None:
    with pytest.raises(CodeError) as raised:
        await remote.run("def f():\n    raise KeyError('k')\nf()")
    assert raised.value.type_name == "KeyError"
    assert "line 2, in f" in raised.value.traceback
    with pytest.raises(TimeLimitExceeded) as timed_out:
        await remote.run("while True: pass", timeout=0.3)
    assert timed_out.value.kind in ("wall", "cpu")
    with pytest.raises(PolicyViolation) as denied:
        await remote.run("import socket")
    assert denied.value.module == "socket" and denied.value.tenant == "default"
    with pytest.raises(InputError):
        await remote.run("x = 1", {"__builtins__": 1})


@module_loop
async def test_an_opaque_output_can_be_an_input_to_a_later_remote_run(remote: Client) -> None:
    made = await remote.run("class Point:\n    def __init__(self): self.x = 3\np = Point()")
    point = made.outputs["p"]
    assert isinstance(point, Opaque) and "Point" in point.type_name
    assert (await remote.run("x = p.x", {"p": point})).outputs == {"x": 3}


@module_loop
async def test_a_workflow_returns_the_same_results_locally_and_remotely(local: Sandbox, remote: Client) -> None:
    builder = WorkflowBuilder()
    builder.add_node("PythonCodeNode", "a", {"code": "pair = (n, n + 1)", "n": 1})
    builder.add_node("AsyncPythonCodeNode", "b", {"code": "await asyncio.sleep(0)\nfirst = pair[0] * 10"})
    builder.add_connection("a", "pair", "b", "pair")
    workflow = builder.build()
    parameters = {"a": {"n": 4}}
    assert await remote.run_workflow(workflow, parameters) == await local.run_workflow(workflow, parameters)

    failing = WorkflowBuilder()
    failing.add_node("PythonCodeNode", "ok", {"code": "v = 1"})
    failing.add_node("PythonCodeNode", "bad", {"code": "1 / v / 0"})
    failing.add_connection("ok", "v", "bad", "v")
    with pytest.raises(WorkflowError) as here:
        await local.run_workflow(failing.build())
    with pytest.raises(WorkflowError) as there:
        await remote.run_workflow(failing.build())
    assert (there.value.node, there.value.completed) == (here.value.node, here.value.completed)
    assert type(there.value.cause) is type(here.value.cause) is CodeError
    assert there.value.__cause__ is there.value.cause


@module_loop
async def test_the_workflow_json_form_round_trips() -> None:
    builder = WorkflowBuilder()
    builder.add_node("PythonCodeNode", "a", {"code": "x = 1", "t": (1, b"2"), "when": "${when}"})
    builder.add_node("PythonCodeNode", "b", {"code": "y = x"})
    builder.add_connection("a", "x.0", "b", "x")
    workflow = builder.build()
    from sandbox import Workflow

    assert Workflow.from_json(workflow.to_json()) == workflow


@module_loop
async def test_quota_refusal_raises_quota_exceeded(server: Server) -> None:
    async with Client(server.url, server.keys["limited"]) as limited:
        with pytest.raises(QuotaExceeded) as refused:
            for _ in range(3):
                await limited.run("x = 1")
    assert refused.value.quota == "rate" and refused.value.tenant == "limited"


@module_loop
async def test_a_polled_run_is_fetched_by_id(remote: Client) -> None:
    run_id = await remote.submit("import asyncio\nawait asyncio.sleep(0.3)\nx = 5")
    result = None
    while result is None:
        result = await remote.poll(run_id)
    assert result.outputs == {"x": 5}


@module_loop
async def test_service_refusals_raise_service_error(server: Server, remote: Client) -> None:
    async with Client(server.url, "sk-wrong") as wrong:
        with pytest.raises(ServiceError) as unauthorised:
            await wrong.run("x = 1")
    assert unauthorised.value.status == 401
    with pytest.raises(ServiceError) as not_mine:
        await remote.run("x = 1", tenant="other")
    assert not_mine.value.status == 403 and "'default'" in str(not_mine.value)
    assert (await remote.run("x = 1", tenant="default")).outputs == {"x": 1}
    with pytest.raises(ServiceError) as not_my_session:
        async with remote.session(tenant="other"):
            pass
    assert not_my_session.value.status == 403
    with pytest.raises(ServiceError) as unknown:
        await remote.poll("no-such-run")
    assert unknown.value.status == 404


def test_the_sync_client_runs_and_raises_like_the_async_one(server: Server) -> None:
    with SyncClient(server.url, server.keys["other"]) as client:
        result = client.run("y = x + 1", {"x": 1})
        assert result.outputs == {"y": 2} and result.stats.tenant == "other"
        with pytest.raises(CodeError):
            client.run("1 / 0")
        assert client.tenant()["tenant"] == "other"


def test_sandbox_run_with_server_uses_the_key_from_the_environment(server: Server, tmp_path: Path) -> None:
    node = tmp_path / "node.py"
    node.write_text("print('to stderr')\ndoubled = n * 2")
    command = [sys.executable, "-m", "sandbox", "run", str(node), "--input", "n=21", "--server", server.url]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=environment_with(SANDBOX_API_KEY=server.keys["other"])
    )
    assert done.returncode == 0, done.stderr
    assert '"doubled": 42' in done.stdout and "to stderr" in done.stderr
    without_key = {name: value for name, value in environment_with().items() if name != "SANDBOX_API_KEY"}
    failed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=without_key)
    assert failed.returncode == 1 and "401" in failed.stderr


def test_sandbox_run_with_server_carries_files_and_the_file_name(server: Server, tmp_path: Path) -> None:
    """--file and --out work through the server as they do locally, and tracebacks name the file."""
    data = tmp_path / "data.txt"
    data.write_text("seven")
    node = tmp_path / "node.py"
    node.write_text("text = open('data.txt').read()\nopen('out/copy.txt', 'w').write(text.upper())\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sandbox", "run", str(node), "--server", server.url]
    env = environment_with(SANDBOX_API_KEY=server.keys["other"])
    done = subprocess.run(
        [*command, "--file", f"data.txt={data}", "--out", str(out)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert '"text": "seven"' in done.stdout and (out / "copy.txt").read_text() == "SEVEN"
    node.write_text("x = 1\n1 / 0\n")
    failed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert failed.returncode == 1 and f'File "{node}", line 2' in failed.stderr, failed.stderr


@module_loop
async def test_a_file_name_reaches_tracebacks_locally_and_remotely(local: Sandbox, remote: Client) -> None:
    code = "x = 1\nraise ValueError('no')\n"
    for runner in (local, remote):
        with pytest.raises(CodeError) as raised:
            await runner.run(code, filename="node.py")
        assert 'File "node.py", line 2' in raised.value.traceback
    async with remote.session() as session:
        with pytest.raises(CodeError) as raised:
            await session.run(code, filename="cell-3")
        assert 'File "cell-3", line 2' in raised.value.traceback


# --- streaming and sessions (the Sandbox's stream and session) -------------------------------------------------


@module_loop
async def test_stream_yields_the_same_outputs_locally_and_remotely(local: Sandbox, remote: Client) -> None:
    code = "print('one', flush=True)\nimport warnings\nwarnings.warn('two')\nx = 1"

    async def collect(stream: Any) -> tuple[list[tuple[str, str]], Result]:
        seen = [(output.stream, output.text) async for output in stream]
        return seen, stream.result

    here, here_result = await collect(local.stream(code))
    there, there_result = await collect(remote.stream(code))
    for name in ("stdout", "stderr"):
        assert "".join(t for s, t in there if s == name) == "".join(t for s, t in here if s == name)
    assert "two" in there_result.stderr
    assert comparable(there_result) == comparable(here_result)


@module_loop
async def test_files_go_in_and_come_back_the_same_locally_and_remotely(local: Sandbox, remote: Client) -> None:
    code = "data = open('in.bin', 'rb').read()\nn = open('out/rev.bin', 'wb').write(data[::-1])"
    files = {"in.bin": b"\x00\x01\xfe"}
    here, there = await local.run(code, files=files), await remote.run(code, files=files)
    assert there.files == here.files == {"rev.bin": b"\xfe\x01\x00"}
    assert comparable(there) == comparable(here)


@module_loop
async def test_a_remote_session_keeps_state(remote: Client) -> None:
    async with remote.session() as session:
        await session.run("total = 1")
        assert (await session.run("total += 1")).outputs == {"total": 2}


def test_importing_sandbox_and_the_client_loads_no_http_stack() -> None:
    check = (
        "import sys, sandbox, sandbox.client, sandbox.jsonform\n"
        "sandbox.Sandbox, sandbox.Result, sandbox.Workflow\n"
        "loaded = sorted({'httpx', 'fastapi', 'starlette', 'uvicorn', 'prometheus_client'} & set(sys.modules))\n"
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
