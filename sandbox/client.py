"""``Client``: the ``Sandbox`` API, through a ``sandbox serve`` (needs the ``serve`` extra).

Owns: the calls that mirror ``Sandbox.run``, ``stream``, ``session`` and
``run_workflow`` over HTTP, the decoding of their answers back into the same
``Result``, ``Output`` and ``SandboxError`` classes (``sandbox.jsonform``),
and ``SyncClient``, the same calls from synchronous code::

    async with Client("http://127.0.0.1:8000", api_key) as sb:   # was: Sandbox(...)
        result = await sb.run("y = x * 2", {"x": 21})

The one difference in signatures: ``tenant`` defaults to None, the tenant of
the API key, because the key, not the caller, decides the tenant; naming
another tenant is refused by the server.

Must never: import httpx before a Client is made (``import sandbox`` and
``import sandbox.client`` stay free of the HTTP stack), or turn an answer it
does not understand into a success: anything but a run's body raises
``ServiceError`` with the status and the server's message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

from sandbox.errors import SandboxClosed, SandboxError
from sandbox.jsonform import (
    JSON,
    decode_mapping,
    encode_files,
    encode_mapping,
    error_from_body,
    result_from_body,
)
from sandbox.result import Result

if TYPE_CHECKING:
    import httpx

    from sandbox.workflow import Workflow


_KEEPALIVE_EXPIRY_S = 5.0
_OUTPUT_STREAMS = ("stdout", "stderr")


class ServiceError(SandboxError):
    """The server refused the request itself (401, 404, 413, 422, ...); ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def _run_body(
    code: str,
    inputs: Mapping[str, object] | None,
    timeout: float | None,
    files: Mapping[str, bytes] | None,
    filename: str = "<code>",
) -> dict[str, JSON]:
    body: dict[str, JSON] = {"code": code, "inputs": encode_mapping(inputs or {})}
    if timeout is not None:
        body["timeout"] = timeout
    if files:
        body["files"] = encode_files(files)
    if filename != "<code>":
        body["filename"] = filename
    return body


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text
    return detail if isinstance(detail, str) else json.dumps(detail)


def _answer(response: httpx.Response) -> dict[str, JSON]:
    """The body of a run's answer, or the exception it stands for."""
    if response.status_code in (200, 429) and response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict) and "ok" in body:
            if not body["ok"]:
                raise error_from_body(body)
            return body
    if response.status_code == 503:
        raise SandboxClosed(f"the server is not taking runs: {_detail(response)}")
    raise ServiceError(
        f"{response.request.method} {response.request.url.path}: {response.status_code} {_detail(response)}",
        status=response.status_code,
    )


class RemoteStream:
    """What ``Client.stream`` returns: iterate it for ``Output`` items; then ``.result`` holds the Result.

    A failed run raises its ``SandboxError`` from the iteration, after the
    output it wrote.
    """

    def __init__(self, client: Client, path: str, body: dict[str, JSON], tenant: str | None = None) -> None:
        self._client, self._path, self._body, self._tenant = client, path, body, tenant
        self.result: Result | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        from sandbox.stream import Output  # sandbox.Output, from its home module

        await self._client.check_tenant(self._tenant)
        async with self._client.http.stream("POST", self._path, json=self._body, timeout=None) as response:
            if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
                "text/event-stream"
            ):
                await response.aread()
                _answer(response)
            async for name, data in _server_sent_events(response):
                if name == "result":
                    self.result = result_from_body(_answer_body(data))
                    return
                if name not in _OUTPUT_STREAMS:
                    raise ServiceError(f"POST {self._path}: unknown event {name[:40]!r} in the stream", status=200)
                yield Output(cast(Literal["stdout", "stderr"], name), data["text"], data["at"])
        raise ServiceError(f"POST {self._path}: the stream ended without a result event", status=200)


def _answer_body(data: dict[str, JSON]) -> dict[str, JSON]:
    if not data.get("ok"):
        raise error_from_body(data)
    return data


async def _server_sent_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, JSON]]]:
    name, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", list[str]()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class RemoteSession:
    """A session on the server (``Client.session``): ``run`` and ``stream`` share one worker."""

    def __init__(self, client: Client, tenant: str | None) -> None:
        self._client, self._tenant = client, tenant
        self.id: str | None = None

    async def __aenter__(self) -> RemoteSession:
        await self._client.check_tenant(self._tenant)
        response = await self._client.http.post("/v1/sessions")
        if response.status_code != 201:
            _answer(response)
        self.id = response.json()["id"]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.id is not None:
            response = await self._client.http.delete(f"/v1/sessions/{self.id}")
            if response.status_code not in (204, 404):
                _answer(response)
            self.id = None

    async def run(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        files: Mapping[str, bytes] | None = None,
        filename: str = "<code>",
    ) -> Result:
        body = _run_body(code, inputs, timeout, files, filename)
        return result_from_body(_answer(await self._client.http.post(f"/v1/sessions/{self.id}/runs", json=body)))

    def stream(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        files: Mapping[str, bytes] | None = None,
        filename: str = "<code>",
    ) -> RemoteStream:
        return RemoteStream(
            self._client, f"/v1/sessions/{self.id}/runs/stream", _run_body(code, inputs, timeout, files, filename)
        )


class Client:
    """An async context manager speaking to ``base_url`` with ``api_key`` (None for --insecure-no-auth)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, connections: int = 100) -> None:
        self.base_url = base_url
        self._api_key = api_key
        self._connections = connections
        self._http: httpx.AsyncClient | None = None
        self._tenant: str | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise SandboxClosed("the client is not open (use it inside 'async with Client(...)')")
        return self._http

    async def __aenter__(self) -> Client:
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # Idle connections are dropped well before the server's keep-alive
        # timeout (30 s), so that a request is never sent on a connection the
        # server is closing (see sandbox.service.main.KEEP_ALIVE_S).
        limits = httpx.Limits(
            max_connections=self._connections,
            max_keepalive_connections=self._connections,
            keepalive_expiry=_KEEPALIVE_EXPIRY_S,
        )
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=None, limits=limits)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def check_tenant(self, tenant: str | None) -> None:
        """A named tenant must be the key's own: the server decides the tenant by the key."""
        if tenant is None:
            return
        if self._tenant is None:
            self._tenant = (await self.tenant())["tenant"]
        if tenant != self._tenant:
            raise ServiceError(f"this API key is tenant {self._tenant!r}'s, not {tenant!r}'s", status=403)

    async def run(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str | None = None,
        timeout: float | None = None,
        files: Mapping[str, bytes] | None = None,
        filename: str = "<code>",
    ) -> Result:
        """``Sandbox.run`` through the server."""
        await self.check_tenant(tenant)
        response = await self.http.post("/v1/runs", json=_run_body(code, inputs, timeout, files, filename))
        return result_from_body(_answer(response))

    def stream(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str | None = None,
        timeout: float | None = None,
        files: Mapping[str, bytes] | None = None,
        filename: str = "<code>",
    ) -> RemoteStream:
        """``Sandbox.stream`` through the server (Server-Sent Events)."""
        return RemoteStream(self, "/v1/runs/stream", _run_body(code, inputs, timeout, files, filename), tenant)

    def session(self, *, tenant: str | None = None) -> RemoteSession:
        """``Sandbox.session`` through the server."""
        return RemoteSession(self, tenant)

    async def run_workflow(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Mapping[str, object]] | None = None,
        *,
        tenant: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, dict[str, object]]:
        """``Sandbox.run_workflow`` through the server; each node's outputs by node id."""
        await self.check_tenant(tenant)
        body: dict[str, JSON] = {
            "workflow": workflow.to_json(),
            "parameters": {node: encode_mapping(values) for node, values in (parameters or {}).items()},
        }
        if timeout is not None:
            body["timeout"] = timeout
        answer = _answer(await self.http.post("/v1/workflows", json=body))
        return {node: decode_mapping(outputs, f"$.results.{node}") for node, outputs in answer["results"].items()}

    async def submit(
        self, code: str, inputs: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> str:
        """Start a run without waiting (``wait=false``); its id, for ``poll``."""
        response = await self.http.post(
            "/v1/runs", params={"wait": "false"}, json=_run_body(code, inputs, timeout, None)
        )
        if response.status_code != 202:
            _answer(response)
        return str(response.json()["id"])

    async def poll(self, run_id: str) -> Result | None:
        """The Result of a submitted run, None while it is queued or running; its error if it failed."""
        response = await self.http.get(f"/v1/runs/{run_id}")
        if response.status_code != 200:
            _answer(response)
        body = response.json()
        return result_from_body(_answer_body(body)) if body["state"] == "done" else None

    async def tenant(self) -> dict[str, JSON]:
        """``GET /v1/tenant``: the key's tenant, its policy and quotas, and its usage."""
        response = await self.http.get("/v1/tenant")
        if response.status_code != 200:
            _answer(response)
        body: dict[str, JSON] = response.json()
        return body


class SyncClient:
    """``Client`` for synchronous code: the same methods, on an event loop of its own.

    ``with SyncClient(url, key) as sb: sb.run(code, inputs)``; ``stream``
    returns an iterator of ``Output`` (``.result`` afterwards), and
    ``session`` a context manager with ``run`` and ``stream``.
    """

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        self._client = Client(base_url, api_key, **options)
        self._runner: asyncio.Runner | None = None

    def __enter__(self) -> SyncClient:
        self._runner = asyncio.Runner()
        self._runner.run(self._client.__aenter__())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            self._runner.run(self._client.__aexit__())
            self._runner.close()
            self._runner = None

    def _call(self, coroutine: Any) -> Any:
        if self._runner is None:
            raise SandboxClosed("the client is not open (use it inside 'with SyncClient(...)')")
        return self._runner.run(coroutine)

    def run(self, code: str, inputs: Mapping[str, object] | None = None, **options: Any) -> Result:
        result: Result = self._call(self._client.run(code, inputs, **options))
        return result

    def run_workflow(self, workflow: Workflow, parameters: Any = None, **options: Any) -> dict[str, dict[str, object]]:
        results: dict[str, dict[str, object]] = self._call(self._client.run_workflow(workflow, parameters, **options))
        return results

    def tenant(self) -> dict[str, JSON]:
        body: dict[str, JSON] = self._call(self._client.tenant())
        return body

    def stream(self, code: str, inputs: Mapping[str, object] | None = None, **options: Any) -> SyncStream:
        return SyncStream(self, self._client.stream(code, inputs, **options))

    def session(self, **options: Any) -> SyncSession:
        return SyncSession(self, self._client.session(**options))


class SyncStream:
    """Iterate for ``Output`` items; ``.result`` holds the Result afterwards."""

    def __init__(self, owner: SyncClient, stream: RemoteStream) -> None:
        self._owner, self._stream = owner, stream

    @property
    def result(self) -> Result | None:
        return self._stream.result

    def __iter__(self) -> Iterator[Any]:
        events = self._stream.__aiter__()

        async def step() -> Any:
            return await events.__anext__()

        while True:
            try:
                yield self._owner._call(step())
            except StopAsyncIteration:
                return


class SyncSession:
    def __init__(self, owner: SyncClient, session: RemoteSession) -> None:
        self._owner, self._session = owner, session

    def __enter__(self) -> SyncSession:
        self._owner._call(self._session.__aenter__())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._owner._call(self._session.__aexit__())

    def run(self, code: str, inputs: Mapping[str, object] | None = None, **options: Any) -> Result:
        result: Result = self._owner._call(self._session.run(code, inputs, **options))
        return result

    def stream(self, code: str, inputs: Mapping[str, object] | None = None, **options: Any) -> SyncStream:
        return SyncStream(self._owner, self._session.stream(code, inputs, **options))
