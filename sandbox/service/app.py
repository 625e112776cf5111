"""The HTTP API of ``sandbox serve``, as FastAPI routes over the public ``Sandbox`` API.

Owns: the routes and their request models, authentication of each ``/v1``
request by its API key, the mapping of run outcomes to bodies and status
codes, Server-Sent Events for streamed runs, and the service's life (start
the Sandbox, refresh metrics, close idle sessions, close everything at the
end).

Status codes, and why: a run that ended, well or badly, is a 200 whose body
says ``ok`` (the failure is the run's answer, not the request's); 400/422
name the malformed field; 401 a missing or unknown key; 404 an id unknown to
the caller's tenant (another tenant's id looks exactly like an unknown one,
so ids cannot be probed); 413 a body past the limit; 429 with
``Retry-After`` a ``QuotaExceeded`` (the body also holds the error, so the
client raises the same exception); 503 while draining.

Must never: reach past the public ``Sandbox`` API (``run``, ``execute``,
``stream``, ``session``, ``run_workflow``, ``stats``), answer one tenant with
another's run or session, or make an outbound request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox import __version__
from sandbox.errors import QuotaExceeded, SandboxError
from sandbox.jsonform import (
    JSON,
    JSONFormError,
    decode_files,
    decode_mapping,
    encode_mapping,
    error_body,
    result_body,
)
from sandbox.policies.model import Policy
from sandbox.result import Result
from sandbox.service.gate import Gate
from sandbox.service.keys import Keys
from sandbox.service.metrics import CONTENT_TYPE, Metrics
from sandbox.service.records import RecordsFull, RunRecords
from sandbox.service.sessions import HeldSession, Sessions
from sandbox.supervisor import DEFAULT_TENANT, Sandbox
from sandbox.workflow import Workflow, WorkflowDefinitionError

MiB = 1024 * 1024
_QUOTA_FIELDS = ("max_concurrency", "max_queued", "rate_per_s", "burst", "weight")
_LAG_PROBE_S = 0.25
_SESSION_PRUNE_S = 30.0  # how often records of sessions the Sandbox has ended are dropped


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``sandbox serve`` is configured with (see ``sandbox serve --help``)."""

    tenants: Mapping[str, Policy]
    keys: Keys | None  # None: --insecure-no-auth, every request is the default tenant
    workers: int | None = None
    max_body_bytes: int = 16 * MiB
    drain_timeout_s: float = 30.0
    metrics: bool = True  # /metrics on the API port (the CLI may move it to a port of its own)
    record_keep_s: float = 600.0
    max_records: int = 10_000


# --- request bodies ---------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Body):
    code: str = Field(description="Python source of the code node")
    inputs: dict[str, Any] = Field(default_factory=dict, description="variables to bind, in the tagged JSON form")
    timeout: float | None = Field(None, gt=0, description="shortens the tenant's wall_time_s, never extends it")
    files: dict[str, str] | None = Field(None, description="files placed in the run's directory: path -> base64")
    filename: str = Field(
        "<code>", min_length=1, max_length=255, description="what tracebacks call the code (a file's name, say)"
    )

    @field_validator("inputs")
    @classmethod
    def _decode_inputs(cls, value: dict[str, Any]) -> dict[str, object]:
        try:
            return decode_mapping(value, "inputs")
        except JSONFormError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("files")
    @classmethod
    def _decode_files(cls, value: dict[str, str] | None) -> dict[str, bytes] | None:
        try:
            return None if value is None else decode_files(value, "files")
        except JSONFormError as exc:
            raise ValueError(str(exc)) from None

    def run_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``Sandbox.run``/``stream``. ``files`` is passed
        only when the request has files, so a run without files is exactly
        ``Sandbox.run(code, inputs, tenant=..., timeout=..., filename=...)``."""
        arguments: dict[str, Any] = {"timeout": self.timeout, "filename": self.filename}
        if self.files:
            arguments["files"] = self.files
        return arguments


class WorkflowRequest(_Body):
    workflow: dict[str, Any] = Field(description="the JSON form of a Workflow (Workflow.to_json())")
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="node id -> runtime inputs")
    timeout: float | None = Field(None, gt=0, description="bounds the whole workflow, in seconds")

    @field_validator("workflow")
    @classmethod
    def _build(cls, value: dict[str, Any]) -> Workflow:
        try:
            return Workflow.from_json(value)
        except WorkflowDefinitionError as exc:
            raise ValueError(exc.message) from None

    @property
    def built(self) -> Workflow:
        """The workflow, as the validator built it (the field's schema is its JSON form)."""
        return cast(Workflow, self.workflow)

    @field_validator("parameters")
    @classmethod
    def _decode_parameters(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, object]]:
        try:
            return {node: decode_mapping(inputs, f"parameters.{node}") for node, inputs in value.items()}
        except JSONFormError as exc:
            raise ValueError(str(exc)) from None


# --- the service ------------------------------------------------------------------------------------------


class Service:
    """The Sandbox and everything the routes share; one per process."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.sandbox = Sandbox(tenants=config.tenants, workers=config.workers)
        self.metrics = Metrics()
        self.records = RunRecords(config.max_records, config.record_keep_s)
        self.sessions = Sessions(self.sandbox)
        self.background: set[asyncio.Future[tuple[int, dict[str, JSON]]]] = set()  # polled runs
        self.ready = False
        self.gate: Gate | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        async with self.sandbox:
            chores = [asyncio.create_task(self._probe()), asyncio.create_task(self._prune_sessions())]
            self.ready = True
            try:
                yield
            finally:
                self.ready = False
                for chore in chores:
                    chore.cancel()
                await asyncio.gather(*chores, return_exceptions=True)
                await self.sessions.close_all()

    async def _probe(self) -> None:
        await self.metrics.probe_loop_lag(_LAG_PROBE_S, self.refresh_metrics)

    async def _prune_sessions(self) -> None:
        while True:
            await asyncio.sleep(_SESSION_PRUNE_S)
            await self.sessions.prune_ended()

    def refresh_metrics(self) -> None:
        self.metrics.refresh(self.sandbox.stats())

    async def drain(self) -> None:
        """Refuse new work, then wait (up to the drain timeout) for requests and polled runs in flight."""
        assert self.gate is not None
        self.gate.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_timeout_s):
                while self.background or self.gate.in_flight:
                    if self.background:
                        await asyncio.wait(self.background)
                    await self.gate.wait_idle()

    # --- outcomes ---------------------------------------------------------------------------------------

    async def outcome(self, tenant: str, call: Awaitable[Result]) -> tuple[int, dict[str, JSON]]:
        """Await a run; its body and status code, counted in the metrics."""
        started = time.monotonic()
        try:
            result = await call
        except SandboxError as error:
            return self.failed(tenant, error, started)
        self.metrics.run_ended(tenant, "ok", time.monotonic() - started)
        return 200, result_body(result)

    def failed(self, tenant: str, error: SandboxError, started: float) -> tuple[int, dict[str, JSON]]:
        if isinstance(error, QuotaExceeded):
            self.metrics.refused(tenant, error.quota)
            return 429, error_body(error)
        self.metrics.run_ended(tenant, type(error).__name__, time.monotonic() - started)
        return 200, error_body(error)

    def retry_after(self, tenant: str, quota: object) -> str:
        """Seconds to wait: until the token bucket holds a run again for ``rate``, else 1 (a queue moves on)."""
        rate = self.sandbox.policies[tenant].rate_per_s
        return str(max(1, math.ceil(1 / rate))) if quota == "rate" and rate else "1"

    def respond(self, tenant: str, status: int, body: dict[str, JSON]) -> JSONResponse:
        headers = None
        if status == 429:
            headers = {"Retry-After": self.retry_after(tenant, body["error"]["details"].get("quota"))}
        return JSONResponse(body, status_code=status, headers=headers)

    async def admitted(self, step: Awaitable[Any]) -> asyncio.Future[Any]:
        """Start ``step`` and let it run up to its first suspension.

        ``Sandbox.execute`` admits a run (its quotas) synchronously, before
        its first suspension. One turn of the loop therefore tells whether a
        polled run was refused, so that the refusal is answered 429 rather
        than 202.
        """
        future = asyncio.ensure_future(step)
        await asyncio.sleep(0)
        return future

    # --- streamed runs ----------------------------------------------------------------------------------

    async def stream_response(
        self, tenant: str, open_stream: Callable[[], Any], on_end: Callable[[], None] | None = None
    ) -> Response:
        """``text/event-stream``: ``stdout``/``stderr`` events as the run writes, then one ``result`` event.

        Why the status line waits for the run's first piece of output (or
        its end): a quota refusal must be a 429, and the status goes out
        before the first event. Waiting costs the client nothing (there is
        nothing to send before that piece), and it needs no guess at when
        the Sandbox has admitted the run. ``on_end`` runs once, however the
        response ends (a session uses it to count its runs in flight).
        """
        started = time.monotonic()
        stream = open_stream()
        iterator = stream.__aiter__()  # held until the response ends: dropping it cancels the run
        failure: SandboxError | None = None
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        except QuotaExceeded as error:
            if on_end is not None:
                on_end()
            return self.respond(tenant, *self.failed(tenant, error, started))
        except SandboxError as error:
            first, failure = None, error
        except BaseException:
            if on_end is not None:
                on_end()
            raise

        async def events() -> AsyncIterator[bytes]:
            output = first
            try:
                if failure is not None:
                    raise failure
                while output is not None:
                    yield _event(output.stream, {"text": output.text, "at": output.at})
                    try:
                        output = await iterator.__anext__()
                    except StopAsyncIteration:
                        output = None
                body = result_body(stream.result)
                self.metrics.run_ended(tenant, "ok", time.monotonic() - started)
            except SandboxError as error:
                body = self.failed(tenant, error, started)[1]
            finally:
                if on_end is not None:
                    on_end()
            yield _event("result", body)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


_bearer = HTTPBearer(auto_error=False, description="an API key from `sandbox key new TENANT`")


async def _authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's tenant, from its API key (401 without a known one).

    ``async`` although it never awaits: FastAPI runs a plain function
    dependency in a thread pool, a thread hop per request for a hash and a
    few comparisons.
    """
    keys = request.app.state.service.config.keys
    if keys is None:
        return DEFAULT_TENANT
    tenant = keys.tenant_of(credentials.credentials) if credentials is not None else None
    if tenant is None:
        detail = "missing API key" if credentials is None else "unknown API key"
        raise HTTPException(401, f"{detail}: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    return str(tenant)


Tenant = Annotated[str, Depends(_authenticate)]


def _event(name: str, data: JSON) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --- the app ----------------------------------------------------------------------------------------------


def create_app(config: ServiceConfig) -> tuple[Gate, Service]:
    """The ASGI app (the FastAPI routes behind the Gate) and its Service."""
    service = Service(config)
    app = FastAPI(
        title="sandbox",
        version=__version__,
        summary="Run untrusted Python code nodes in confined worker processes",
        lifespan=service.lifespan,
        max_body_size=config.max_body_bytes,
    )
    app.state.service = service
    sb = service.sandbox

    @app.post("/v1/runs", tags=["runs"])
    async def run(body: RunRequest, tenant: Tenant, wait: bool = True) -> Response:
        """Run code. With ``wait=false``, answer 202 ``{"id"}`` at once; poll ``GET /v1/runs/{id}``."""
        if wait:
            call = sb.run(body.code, body.inputs, tenant=tenant, **body.run_arguments())
            return service.respond(tenant, *await service.outcome(tenant, call))
        try:
            record = service.records.add(tenant)
        except RecordsFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "1"})
        call = sb.execute(body.code, body.inputs, tenant=tenant, on_start=record.started, **body.run_arguments())
        task = await service.admitted(service.outcome(tenant, call))
        if task.done() and task.result()[0] == 429:
            service.records.finish(record, task.result()[1])
            return service.respond(tenant, *task.result())
        service.background.add(task)

        def finished(done: asyncio.Future[tuple[int, dict[str, JSON]]]) -> None:
            service.background.discard(done)
            service.records.finish(record, done.result()[1])

        task.add_done_callback(finished)
        return JSONResponse({"id": record.id}, status_code=202)

    @app.get("/v1/runs/{run_id}", tags=["runs"])
    async def poll(run_id: str, tenant: Tenant) -> Response:
        """A polled run: ``{"id", "state": "queued"|"running"|"done"}``, plus its body once done."""
        record = service.records.get(tenant, run_id)
        if record is None:
            raise HTTPException(404, f"no run {run_id!r} (unknown, expired, or not yours)")
        return JSONResponse(record.view())

    @app.post("/v1/runs/stream", tags=["runs"])
    async def stream(body: RunRequest, tenant: Tenant) -> Response:
        """Run code, answering Server-Sent Events: ``stdout``/``stderr`` as the run writes, then ``result``."""
        return await service.stream_response(
            tenant, lambda: sb.stream(body.code, body.inputs, tenant=tenant, **body.run_arguments())
        )

    @app.post("/v1/sessions", status_code=201, tags=["sessions"])
    async def open_session(tenant: Tenant) -> Response:
        """Open a session: runs that share one worker and its state, until DELETE."""
        try:
            held = await service.sessions.open(tenant)
        except SandboxError as error:
            return service.respond(tenant, *service.failed(tenant, error, time.monotonic()))
        return JSONResponse({"id": held.id}, status_code=201)

    def held_session(session_id: str, tenant: str) -> HeldSession:
        held = service.sessions.get(tenant, session_id)
        if held is None:
            raise HTTPException(404, f"no session {session_id!r} (unknown, ended, or not yours)")
        held.touch()
        return held

    @app.post("/v1/sessions/{session_id}/runs", tags=["sessions"])
    async def session_run(session_id: str, body: RunRequest, tenant: Tenant) -> Response:
        """Run code in a session, as ``POST /v1/runs`` (always waits)."""
        held = held_session(session_id, tenant)
        held.busy += 1
        try:
            call = held.session.run(body.code, body.inputs, **body.run_arguments())
            return service.respond(tenant, *await service.outcome(tenant, call))
        finally:
            held.busy -= 1
            held.touch()

    @app.post("/v1/sessions/{session_id}/runs/stream", tags=["sessions"])
    async def session_stream(session_id: str, body: RunRequest, tenant: Tenant) -> Response:
        """Run code in a session, answering Server-Sent Events as ``POST /v1/runs/stream``."""
        held = held_session(session_id, tenant)
        held.busy += 1

        def ended() -> None:
            held.busy -= 1
            held.touch()

        return await service.stream_response(
            tenant, lambda: held.session.stream(body.code, body.inputs, **body.run_arguments()), ended
        )

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
    async def close_session(session_id: str, tenant: Tenant) -> Response:
        """End a session and release its worker."""
        await service.sessions.close(held_session(session_id, tenant))
        return Response(status_code=204)

    @app.post("/v1/workflows", tags=["workflows"])
    async def workflow(body: WorkflowRequest, tenant: Tenant) -> Response:
        """Run a workflow: ``{"ok": true, "results": {node_id: outputs}}``, or a failure naming the node."""
        started = time.monotonic()
        try:
            results = await sb.run_workflow(body.built, body.parameters, tenant=tenant, timeout=body.timeout)
        except SandboxError as error:
            return service.respond(tenant, *service.failed(tenant, error, started))
        service.metrics.run_ended(tenant, "ok", time.monotonic() - started)
        return JSONResponse({"ok": True, "results": {node: encode_mapping(out) for node, out in results.items()}})

    @app.get("/v1/tenant", tags=["tenant"])
    async def tenant_info(tenant: Tenant) -> Response:
        """The caller's tenant, its effective policy (limits and quotas) and its current usage."""
        policy = sb.policies[tenant]
        usage = asdict(sb.stats().tenant(tenant))
        usage["sessions"] = service.sessions.count(tenant)
        return JSONResponse(
            {
                "tenant": tenant,
                "policy": policy.model_dump(mode="json"),
                "quotas": {name: getattr(policy, name) for name in _QUOTA_FIELDS},
                "usage": usage,
            }
        )

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        """Answers while the process is alive."""
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        """Answers 200 while the pool is started and the service is not draining, else 503."""
        draining = service.gate is not None and service.gate.draining
        if not service.ready or draining:
            return JSONResponse({"status": "draining" if draining else "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    if config.metrics:

        @app.get("/metrics", tags=["operations"], response_class=Response)
        async def metrics() -> Response:
            """Prometheus text format."""
            service.refresh_metrics()
            return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    gate = Gate(app)
    service.gate = gate
    return gate, service
