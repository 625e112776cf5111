"""What crosses between a ClusterSandbox, its node agents and their node supervisors.

Owns: the encoding of a run request, of its outcome (a ``Result`` or a
``SandboxError``) and of stream events, and the bounded framing on the node
supervisor's Unix socket.

Must never: unpickle a reply with ``pickle``/``cloudpickle``. Requests come
from the trusted client (the operator's code, which Ray already carries as
pickles), so they are cloudpickles, as inputs must be (functions and lambdas
are inputs). Replies carry what workers produced. The node supervisor has
already decoded those values with ``sandbox.snapshot``; here a reply is a
JSON header plus byte blobs, every output value is re-decoded on the client
by that same restricted decoder, and an ``Opaque`` stays bytes. So a node,
even a compromised one, can hand the client no more than a local worker
could: inert data, ``Opaque`` handles and strings.

::

    client ── Ray call(request: bytes) ──▶ agent ── [u32 len][request] ──▶ node supervisor
    client ◀── reply: bytes ─────────────── agent ◀── [u32 len][reply] ─── node supervisor

    reply = [u32 header length][JSON header][output blobs, in header order]

The agent forwards bytes without decoding them.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import struct
from collections.abc import Mapping
from typing import Any

import cloudpickle

from sandbox import errors
from sandbox.errors import SandboxError
from sandbox.opaque import Opaque
from sandbox.result import Result, RunStats
from sandbox.runtime.wire import FRAME_HEADER, frame
from sandbox.snapshot import Allowance, Budget, decode_value

MAX_REQUEST_BYTES = 512 * 1024 * 1024
_HEADER = struct.Struct("<I")
# Host-made pickles of values the node supervisor already accepted: a wider
# budget than for a worker's reply, so that what decoded there decodes here.
_BUDGET = Budget(max_ops=8_000_000, max_nodes=4_000_000)
_ERROR_TYPES = {
    name: value for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, SandboxError)
}


class ProtocolError(Exception):
    """The peer sent a frame that breaks this protocol."""


# --- framing ---------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next payload, None on a clean end of stream; ProtocolError past ``limit``."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from None
        return None
    (length,) = FRAME_HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {limit}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("stream ended inside a frame") from None


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(frame(payload))


# --- requests (trusted client -> node) ------------------------------------------------


def encode_request(op: str, **fields: object) -> bytes:
    payload: bytes = cloudpickle.dumps({"op": op, **fields}, protocol=5)
    return payload


def decode_request(payload: bytes) -> dict[str, Any]:
    """Only ever called on frames from the node's own agent (see the module docstring)."""
    request: object = pickle.loads(payload)
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ProtocolError("a request must be a dict with an 'op'")
    return request


# --- replies (node -> client) ----------------------------------------------------------


def _pack(header: Mapping[str, object], blobs: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    encoded = json.dumps(header).encode()
    return b"".join([_HEADER.pack(len(encoded)), encoded, *blobs])


def _unpack(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(payload) < _HEADER.size:
        raise ProtocolError("reply shorter than its header")
    (length,) = _HEADER.unpack_from(payload)
    end = _HEADER.size + length
    if end > len(payload):
        raise ProtocolError("reply header runs past the reply")
    try:
        header = json.loads(payload[_HEADER.size : end])
    except ValueError as exc:
        raise ProtocolError(f"reply header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("reply header is not an object")
    return header, memoryview(payload)[end:]


def encode_result(result: Result, node: str) -> bytes:
    """A Result as the node supervisor got it, with ``stats.node`` set to ``node``."""
    outputs, blobs = [], []
    for name, value in result.outputs.items():
        if isinstance(value, Opaque):
            outputs.append([name, "opaque", value.type_name, value.reason, value.size])
            blobs.append(value.data)
        else:
            blob = pickle.dumps(value, protocol=5)
            outputs.append([name, "value", "", "", len(blob)])
            blobs.append(blob)
    stats = {**result.stats.as_dict(), "node": node}
    header = {
        "kind": "result",
        "stdout": result.stdout,
        "stderr": result.stderr,
        "skipped": result.skipped,
        "stats": stats,
        "outputs": outputs,
    }
    return _pack(header, blobs)


def encode_error(error: SandboxError) -> bytes:
    """A SandboxError as its type name and its plain attributes (strings and numbers only)."""
    attributes = {key: value for key, value in vars(error).items() if _is_plain(value)}
    return _pack({"kind": "error", "type": type(error).__name__, "attributes": attributes})


def encode_event(**fields: object) -> bytes:
    """A stream event (an output chunk) or any other small JSON message."""
    return _pack({"kind": "event", **fields})


def is_event(payload: bytes) -> bool:
    """Whether a reply is a stream event (more follows) rather than the outcome."""
    header, _ = _unpack(payload)
    return header.get("kind") == "event"


def _is_plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def decode_reply(payload: bytes) -> Result | SandboxError | dict[str, Any]:
    """A Result, the SandboxError to raise, or an event's fields."""
    header, rest = _unpack(payload)
    kind = header.get("kind")
    if kind == "error":
        return _rebuild_error(header)
    if kind == "event":
        return header
    if kind != "result":
        raise ProtocolError(f"unknown reply kind {kind!r}")
    try:
        return _rebuild_result(header, rest)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed result: {type(exc).__name__}: {exc}") from None


def _rebuild_result(header: dict[str, Any], rest: memoryview) -> Result:
    allowance = Allowance(_BUDGET)
    outputs: dict[str, object] = {}
    offset = 0
    for name, kind, type_name, reason, size in header["outputs"]:
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise ProtocolError(f"output {name!r} runs past the reply")
        blob = bytes(rest[offset : offset + size])
        offset += size
        if kind == "opaque":
            outputs[str(name)] = Opaque(blob, str(type_name), str(reason))
        else:
            outputs[str(name)] = decode_value(blob, "value", _BUDGET, allowance)
    stats = RunStats(**{field: header["stats"][field] for field in RunStats.__dataclass_fields__})
    skipped = {str(name): str(why) for name, why in header["skipped"].items()}
    return Result(outputs, str(header["stdout"]), str(header["stderr"]), skipped, stats)


def _rebuild_error(header: dict[str, Any]) -> SandboxError:
    """The error as the node raised it, without calling its constructor.

    Only the classes of ``sandbox.errors`` are rebuilt; anything else the
    node names becomes a plain SandboxError with its message.
    """
    attributes = header.get("attributes")
    if not isinstance(attributes, dict):
        raise ProtocolError("error reply without attributes")
    cls = _ERROR_TYPES.get(str(header.get("type")), SandboxError)
    error = cls.__new__(cls)
    message = str(attributes.get("message", ""))
    Exception.__init__(error, message)
    error.__dict__.update({str(key): value for key, value in attributes.items() if _is_plain(value)})
    error.message = message
    error.stdout = str(attributes.get("stdout", ""))
    error.stderr = str(attributes.get("stderr", ""))
    return error
