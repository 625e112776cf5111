"""``sandbox serve`` over real HTTP: a real server subprocess on 127.0.0.1, called with httpx."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sandbox import SandboxStats, TenantStats
from sandbox.service.metrics import Metrics
from tests.serving import Server, running_server

pytestmark = pytest.mark.timeout(180)

SLOW = "import asyncio\nawait asyncio.sleep(1.5)\ndone = True"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client:
        yield client


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if _normalise(sample) == wanted:
            return float(value)
    return 0.0


def _normalise(sample: str) -> str:
    if "{" not in sample:
        return sample
    name, _, rest = sample.partition("{")
    labels = sorted(rest.rstrip("}").split(","))
    return name + "{" + ",".join(labels) + "}"


# --- operations ---------------------------------------------------------------------------------------------


def test_health_ready_and_openapi_match_the_routes(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "alive"}
    assert http.get("/readyz").json() == {"status": "ready"}
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths) >= {
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/stream",
        "/v1/sessions",
        "/v1/sessions/{session_id}/runs",
        "/v1/sessions/{session_id}/runs/stream",
        "/v1/sessions/{session_id}",
        "/v1/workflows",
        "/v1/tenant",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert set(paths["/v1/sessions/{session_id}"]) == {"delete"}
    run_body = http.get("/openapi.json").json()["components"]["schemas"]["RunRequest"]
    assert set(run_body["properties"]) == {"code", "inputs", "timeout", "files", "filename"}


def test_metrics_count_runs_by_tenant_and_outcome(http: httpx.Client) -> None:
    ok_before = metric(http, "sandbox_runs_total", tenant="default", outcome="ok")
    failed_before = metric(http, "sandbox_runs_total", tenant="default", outcome="CodeError")
    durations_before = metric(http, "sandbox_run_duration_seconds_count", tenant="default")
    assert http.post("/v1/runs", json={"code": "x = 1"}).json()["ok"] is True
    assert http.post("/v1/runs", json={"code": "1 / 0"}).json()["ok"] is False
    assert metric(http, "sandbox_runs_total", tenant="default", outcome="ok") == ok_before + 1
    assert metric(http, "sandbox_runs_total", tenant="default", outcome="CodeError") == failed_before + 1
    assert metric(http, "sandbox_run_duration_seconds_count", tenant="default") == durations_before + 2
    text = http.get("/metrics").text
    for family in ("sandbox_queue_depth", "sandbox_workers", "sandbox_event_loop_lag_seconds"):
        assert f"# TYPE {family} gauge" in text
    assert metric(http, "sandbox_workers", state="idle") + metric(http, "sandbox_workers", state="busy") >= 1


def test_metrics_show_queue_depth_while_runs_wait(http: httpx.Client, server: Server) -> None:
    # Two workers: the third and fourth slow runs wait in the queue.
    ids = [http.post("/v1/runs?wait=false", json={"code": SLOW}).json()["id"] for _ in range(4)]
    deadline = time.monotonic() + 20
    depth = 0.0
    while time.monotonic() < deadline and depth < 1:
        depth = metric(http, "sandbox_queue_depth", tenant="default")
    assert depth >= 1
    for run_id in ids:
        wait_done(http, run_id)
    # Its runs are over, and every scrape refreshes the gauges first.
    assert metric(http, "sandbox_queue_depth", tenant="default") == 0
    assert metric(http, "sandbox_runs_in_flight", tenant="default") == 0


def test_the_gauges_of_a_tenant_whose_load_ended_go_back_to_zero() -> None:
    """A snapshot holds only tenants with load: one that had load and has none now reads 0, not its last figures."""
    metrics = Metrics()
    metrics.refresh(SandboxStats(capacity=2, workers={"busy": 1}, tenants={"a": TenantStats(3, 1, 1)}))
    assert 'sandbox_queue_depth{tenant="a"} 3.0' in metrics.exposition().decode()
    metrics.refresh(SandboxStats(capacity=2, workers={"busy": 0}, tenants={}))
    text = metrics.exposition().decode()
    assert 'sandbox_queue_depth{tenant="a"} 0.0' in text
    assert 'sandbox_runs_in_flight{tenant="a"} 0.0' in text


# --- auth -----------------------------------------------------------------------------------------------------


def test_a_missing_or_unknown_key_gets_401(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        response = anonymous.post("/v1/runs", json={"code": "x = 1"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "missing API key" in response.json()["detail"]
        wrong = anonymous.get("/v1/tenant", headers={"Authorization": "Bearer sk-not-a-key"})
        assert wrong.status_code == 401
        assert "unknown API key" in wrong.json()["detail"]
        assert anonymous.get("/healthz").status_code == 200  # operations need no key


def test_the_key_decides_the_tenant(server: Server) -> None:
    for tenant in ("default", "other"):
        info = httpx.get(f"{server.url}/v1/tenant", headers=server.headers(tenant)).json()
        assert info["tenant"] == tenant
        assert info["quotas"]["max_queued"] == 10_000
        assert info["policy"]["wall_time_s"] == 5.0
        assert set(info["usage"]) >= {"queued", "running", "workers", "sessions"}
        result = httpx.post(f"{server.url}/v1/runs", headers=server.headers(tenant), json={"code": "x = 1"}).json()
        assert result["stats"]["tenant"] == tenant


def test_another_tenants_run_id_is_answered_like_an_unknown_one(http: httpx.Client, server: Server) -> None:
    run_id = http.post("/v1/runs?wait=false", json={"code": "x = 1"}).json()["id"]
    theirs = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=server.headers("other"))
    unknown = http.get("/v1/runs/no-such-run")
    assert theirs.status_code == unknown.status_code == 404
    assert wait_done(http, run_id)["outputs"] == {"x": 1}


# --- runs -------------------------------------------------------------------------------------------------------


def test_a_run_answers_its_outputs_in_the_tagged_form(http: httpx.Client) -> None:
    code = "import datetime, decimal\nt = (1, 'a')\nb = raw * 2\ns = {3}\nd = decimal.Decimal('1.10')\n"
    code += "when = datetime.date(2024, 5, 6)\nkeys = {1: 'one'}\nprint('hi')\nclass C: pass\nc = C()"
    inputs = {"raw": {"$type": "bytes", "base64": base64.b64encode(b"ab").decode()}}
    body = http.post("/v1/runs", json={"code": code, "inputs": inputs}).json()
    assert body["ok"] is True
    outputs = body["outputs"]
    assert outputs["t"] == {"$type": "tuple", "items": [1, "a"]}
    assert outputs["b"] == {"$type": "bytes", "base64": base64.b64encode(b"abab").decode()}
    assert outputs["s"] == {"$type": "set", "items": [3]}
    assert outputs["d"] == {"$type": "decimal", "value": "1.10"}
    assert outputs["when"] == {"$type": "date", "value": "2024-05-06"}
    assert outputs["keys"] == {"$type": "dict", "items": [[1, "one"]]}
    assert outputs["c"]["$type"] == "opaque" and "C" in outputs["c"]["type_name"]
    assert body["stdout"] == "hi\n" and body["stderr"] == ""
    assert body["skipped"] == {"datetime": "module", "decimal": "module", "C": "class"}
    assert set(body["stats"]) >= {"wall_s", "cpu_s", "peak_memory_bytes", "worker_pid", "tenant"}


def test_a_failed_run_is_a_200_naming_the_error_type(http: httpx.Client) -> None:
    failed = http.post("/v1/runs", json={"code": "print('so far')\nraise KeyError('k')"})
    assert failed.status_code == 200
    body = failed.json()
    assert body["ok"] is False
    assert body["error"]["type"] == "CodeError"
    assert body["error"]["details"]["type_name"] == "KeyError"
    assert body["stdout"] == "so far\n"
    timed_out = http.post("/v1/runs", json={"code": "while True: pass", "timeout": 0.5}).json()
    assert timed_out["error"]["type"] == "TimeLimitExceeded"
    assert timed_out["error"]["details"]["kind"] in ("wall", "cpu")
    denied = http.post("/v1/runs", json={"code": "import socket"}).json()
    assert denied["error"]["type"] == "PolicyViolation"
    assert denied["error"]["details"]["module"] == "socket"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"code": 1}, ["body", "code"]),
        ({"inputs": {}}, ["body", "code"]),
        ({"code": "x = 1", "timeout": -1}, ["body", "timeout"]),
        ({"code": "x = 1", "inputs": {"v": {"$type": "nonsense"}}}, ["body", "inputs"]),
        ({"code": "x = 1", "inputs": {"v": {"$type": "bytes", "base64": "!!"}}}, ["body", "inputs"]),
        ({"code": "x = 1", "colour": "red"}, ["body", "colour"]),
        ({"code": "x = 1", "files": {"a.txt": "not base64!"}}, ["body", "files"]),
        ({"code": "x = 1", "filename": "x" * 256}, ["body", "filename"]),
        ({"code": "x = 1", "filename": ""}, ["body", "filename"]),
    ],
)
def test_a_malformed_body_gets_422_naming_the_field(http: httpx.Client, body: dict, field: list[str]) -> None:
    response = http.post("/v1/runs", json=body)
    assert response.status_code == 422
    assert any(error["loc"][: len(field)] == field for error in response.json()["detail"]), response.json()


def test_a_body_that_is_not_json_gets_422(http: httpx.Client) -> None:
    response = http.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_a_polled_run_goes_queued_or_running_then_done(http: httpx.Client) -> None:
    accepted = http.post("/v1/runs?wait=false", json={"code": SLOW})
    assert accepted.status_code == 202
    run_id = accepted.json()["id"]
    first = http.get(f"/v1/runs/{run_id}").json()
    assert first["state"] in ("queued", "running") and "ok" not in first
    seen = {first["state"]}
    while (state := http.get(f"/v1/runs/{run_id}").json())["state"] != "done":
        seen.add(state["state"])
        time.sleep(0.05)
    assert "running" in seen
    assert state["ok"] is True and state["outputs"] == {"done": True}


def wait_done(http: httpx.Client, run_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = http.get(f"/v1/runs/{run_id}").json()
        if body["state"] == "done":
            return body
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} not done after {timeout_s} s")


# --- 413 and 429 -------------------------------------------------------------------------------------------------


def test_a_body_past_the_limit_gets_413_by_its_length(http: httpx.Client) -> None:
    big = json.dumps({"code": "x = 1", "inputs": {"blob": "a" * (17 * 1024 * 1024)}}).encode()
    response = http.post("/v1/runs", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_a_chunked_body_past_the_limit_gets_413_while_it_is_read(http: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"code": "x = 1", "inputs": {"blob": "'
        for _ in range(64):  # 64 MiB offered; the server stops reading past 16
            sent += 1
            yield b"a" * (1024 * 1024)
        yield b'"}}'

    try:
        response = http.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"})
    except httpx.HTTPError:
        pytest.fail("the server should answer 413 rather than drop the connection")
    assert response.status_code == 413
    assert http.get("/healthz").status_code == 200


def test_a_tenant_over_its_rate_gets_429_with_retry_after(server: Server, http: httpx.Client) -> None:
    refusals_before = metric(http, "sandbox_quota_refusals_total", tenant="limited", quota="rate")
    with httpx.Client(base_url=server.url, headers=server.headers("limited"), timeout=30) as limited:
        first = limited.post("/v1/runs", json={"code": "x = 1"})
        assert first.status_code == 200  # the bucket held one run (burst = 1)
        refused = limited.post("/v1/runs", json={"code": "x = 1"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "100"  # one token per 100 s at 0.01 runs/s
        assert refused.json()["error"]["type"] == "QuotaExceeded"
        assert refused.json()["error"]["details"]["quota"] == "rate"
        polled = limited.post("/v1/runs?wait=false", json={"code": "x = 1"})
        assert polled.status_code == 429
    assert metric(http, "sandbox_quota_refusals_total", tenant="limited", quota="rate") == refusals_before + 2


# --- workflows ----------------------------------------------------------------------------------------------------


def _workflow(second_code: str) -> dict:
    return {
        "nodes": [
            {"id": "first", "kind": "PythonCodeNode", "parameters": {"code": "value = base + 1", "base": 1}},
            {"id": "second", "kind": "PythonCodeNode", "parameters": {"code": second_code}},
        ],
        "connections": [{"source": "first", "source_path": "value", "target": "second", "target_input": "n"}],
    }


def test_a_workflow_answers_each_nodes_outputs(http: httpx.Client) -> None:
    body = {"workflow": _workflow("doubled = (n * 2, n)"), "parameters": {"first": {"base": 10}}}
    answer = http.post("/v1/workflows", json=body).json()
    assert answer == {
        "ok": True,
        "results": {"first": {"value": 11}, "second": {"doubled": {"$type": "tuple", "items": [22, 11]}}},
    }


def test_a_failed_workflow_names_the_node(http: httpx.Client) -> None:
    answer = http.post("/v1/workflows", json={"workflow": _workflow("1 / n / 0")}).json()
    assert answer["ok"] is False
    assert answer["error"]["type"] == "WorkflowError"
    assert answer["error"]["details"]["node"] == "second"
    assert answer["error"]["causes"]["cause"]["type"] == "CodeError"
    assert answer["error"]["details"]["completed"] == {"first": {"value": 2}}


def test_a_malformed_workflow_gets_422_naming_the_field(http: httpx.Client) -> None:
    missing = http.post("/v1/workflows", json={"workflow": {"nodes": [{"id": "a", "kind": "PythonCodeNode"}]}})
    assert missing.status_code == 422
    assert "workflow.nodes[0]" in json.dumps(missing.json()) and "parameters" in json.dumps(missing.json())
    cyclic = _workflow("x = n")
    cyclic["connections"].append({"source": "second", "source_path": "x", "target": "first", "target_input": "m"})
    assert http.post("/v1/workflows", json={"workflow": cyclic}).status_code == 422


# --- streaming, sessions, files (the Sandbox's stream, session and files=) ----------------------------------------


def test_stream_delivers_output_before_the_run_ends(server: Server) -> None:
    code = "import asyncio\nprint('early', flush=True)\nawait asyncio.sleep(1.5)\nprint('late')\nx = 1"
    arrivals: list[tuple[float, str, dict]] = []
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{server.url}/v1/runs/stream", headers=server.headers(), json={"code": code}, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                arrivals.append((time.monotonic() - started, event, json.loads(line[6:])))
    names = [name for _, name, _ in arrivals]
    assert names[0] == "stdout" and names[-1] == "result"
    assert arrivals[0][2]["text"] == "early\n"
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0  # "early" came a sleep before the result
    final = arrivals[-1][2]
    assert final["ok"] is True and final["outputs"] == {"x": 1}
    assert final["stdout"] == "early\nlate\n"


def test_sessions_keep_state_and_belong_to_their_tenant(http: httpx.Client, server: Server) -> None:
    opened = http.post("/v1/sessions")
    assert opened.status_code == 201
    session = opened.json()["id"]
    assert http.post(f"/v1/sessions/{session}/runs", json={"code": "counter = 41"}).json()["ok"] is True
    second = http.post(f"/v1/sessions/{session}/runs", json={"code": "counter += 1"}).json()
    assert second["outputs"]["counter"] == 42
    theirs = httpx.post(
        f"{server.url}/v1/sessions/{session}/runs", headers=server.headers("other"), json={"code": "x = counter"}
    )
    assert theirs.status_code == 404
    assert httpx.delete(f"{server.url}/v1/sessions/{session}", headers=server.headers("other")).status_code == 404
    assert http.delete(f"/v1/sessions/{session}").status_code == 204
    assert http.post(f"/v1/sessions/{session}/runs", json={"code": "x = 1"}).status_code == 404


def test_sessions_past_the_policys_max_sessions_get_429_naming_it(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers("other"), timeout=30) as other:
        first = other.post("/v1/sessions")
        assert first.status_code == 201
        refused = other.post("/v1/sessions")
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        assert refused.json()["error"]["type"] == "QuotaExceeded"
        assert "max_sessions" in refused.json()["error"]["message"]
        assert other.delete(f"/v1/sessions/{first.json()['id']}").status_code == 204
        again = other.post("/v1/sessions")
        assert again.status_code == 201
        assert other.delete(f"/v1/sessions/{again.json()['id']}").status_code == 204


def test_files_go_in_and_come_back(http: httpx.Client) -> None:
    data = base64.b64encode(b"a,b\n1,2\n").decode()
    code = "text = open('in.csv').read()\nsize = open('out/upper.txt', 'w').write(text.upper())"
    body = http.post("/v1/runs", json={"code": code, "files": {"in.csv": data}}).json()
    assert body["ok"] is True and body["outputs"]["text"] == "a,b\n1,2\n"
    assert {name: base64.b64decode(text) for name, text in body["files"].items()} == {"upper.txt": b"A,B\n1,2\n"}
    assert body["skipped_files"] == {}


def test_options_move_metrics_to_a_port_of_their_own_and_set_the_body_limit(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with running_server(tmp_path, "--metrics-port", str(port), "--max-body-bytes", "1000") as moved:
        small = httpx.post(f"{moved.url}/v1/runs", headers=moved.headers(), json={"code": "x = '" + "a" * 900 + "'"})
        assert small.status_code == 200
        large = httpx.post(f"{moved.url}/v1/runs", headers=moved.headers(), json={"code": "x = '" + "a" * 1000 + "'"})
        assert large.status_code == 413
        assert httpx.get(f"{moved.url}/metrics").status_code == 404
        assert httpx.post(f"{moved.url}/v1/runs", headers=moved.headers(), json={"code": "x = 1"}).json()["ok"]
        deadline = time.monotonic() + 10
        while "sandbox_runs_total{" not in (text := httpx.get(f"http://127.0.0.1:{port}/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert 'sandbox_runs_total{outcome="ok",tenant="default"} 2.0' in text  # the small run and this one
        assert "/metrics" not in httpx.get(f"{moved.url}/openapi.json").json()["paths"]


# --- startup refusals and drain ------------------------------------------------------------------------------------


def test_serve_refuses_to_start_without_keys_and_insecure_serves_loopback_only(tmp_path: Path) -> None:
    no_keys = subprocess.run([sys.executable, "-m", "sandbox", "serve"], capture_output=True, text=True, timeout=60)
    assert no_keys.returncode == 2 and "--keys FILE" in no_keys.stderr and "--insecure-no-auth" in no_keys.stderr
    public = subprocess.run(
        [sys.executable, "-m", "sandbox", "serve", "--insecure-no-auth", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert public.returncode == 2 and "loopback" in public.stderr
    bad_tenant = tmp_path / "keys.toml"
    bad_tenant.write_text('[keys]\n"sha256:' + "0" * 64 + '" = "nobody"\n')
    command = [sys.executable, "-m", "sandbox", "serve", "--keys", str(bad_tenant)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "'nobody'" in refused.stderr


def test_key_new_prints_the_key_then_its_keys_line() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "sandbox", "key", "new", "analytics"], capture_output=True, text=True, timeout=60
    )
    key, line = printed.stdout.splitlines()
    from sandbox.service.keys import digest

    assert key.startswith("sk-") and len(key) > 40
    assert line == f'"{digest(key)}" = "analytics"'
    assert key not in line


def test_sigterm_drains_in_flight_runs_then_stops_everything(tmp_path: Path) -> None:
    with running_server(tmp_path, "--drain-timeout", "30") as server:
        process = psutil.Process(server.process.pid)
        outcome: dict = {}

        def slow_run() -> None:
            long_run = "import asyncio\nawait asyncio.sleep(3)\ndone = True"
            outcome["response"] = httpx.post(
                f"{server.url}/v1/runs", headers=server.headers(), json={"code": long_run}, timeout=60
            )

        caller = threading.Thread(target=slow_run)
        caller.start()
        # The polled run ends well before the waiting one, which keeps the server up while the result is fetched.
        short_run = "import asyncio\nawait asyncio.sleep(0.3)\ndone = True"
        polled = httpx.post(f"{server.url}/v1/runs?wait=false", headers=server.headers(), json={"code": short_run})
        polled_id = polled.json()["id"]
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.url}/v1/tenant", headers=server.headers()).json()["usage"]["running"] == 0:
            assert time.monotonic() < deadline, "the slow run never started"
            time.sleep(0.02)
        workers = process.children(recursive=True)
        assert workers
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"{server.url}/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.status_code == 503
        refused = httpx.post(f"{server.url}/v1/runs", headers=server.headers(), json={"code": "x = 1"})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) > 0
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as reader:
            assert wait_done(reader, polled_id)["outputs"] == {"done": True}  # GETs are still answered
        caller.join(timeout=30)
        assert outcome["response"].status_code == 200
        assert outcome["response"].json()["outputs"] == {"done": True}
        assert server.process.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"left behind: {alive}"
