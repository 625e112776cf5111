"""The wire format between the supervisor and one worker.

Owns: framing, the request tuple, and the binary reply layout, with both its
encoder (used in the worker) and its defensive decoder (used by the host).

Must never: interpret a value. Output values travel as opaque byte strings
here; turning them into objects is ``sandbox.snapshot``'s job on the host and
plain unpickling inside the worker.

::

    supervisor ── [u32 len][pickle: request] ──────────▶ worker
    supervisor ◀── [u32 len][kind byte][body] ──────── worker

Every frame is a little-endian u32 payload length followed by the payload.
The two directions differ on purpose. The worker trusts its host, so
requests are pickles. The host trusts nothing from a worker once user code
has run there, so replies use a fixed layout of integers, floats and
length-prefixed byte fields that :func:`decode_reply` walks with bounds
checks and no recursion. It never unpickles, never evaluates, and rejects
any deviation with :class:`ProtocolError`.

Reply body, after the kind byte ``REPLY``::

    token 16s | status B | cpu_s d | peak_rss Q | worker_cpu_s d | retire B
    n_outputs I | n_skipped I | n_error I
    n_outputs x (name, type_label, blob) | n_skipped x (name, reason) | n_error x field

where each field is ``[u32 len][bytes]``. Names are identifiers, labels and
reasons are UTF-8. The error fields are (type_name, message, traceback, detail).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

FRAME_HEADER = struct.Struct("<I")
MAX_HELLO_BYTES = 64 * 1024
TOKEN_BYTES = 16

KIND_HELLO = 1
KIND_REPLY = 2
# A worker that finds its channel closed or replaced (user code did it) exits
# with this code, so the host can say so instead of reporting a crash.
EXIT_CHANNEL_LOST = 75

# Reply status codes.
OK = 0
CODE_ERROR = 1
MEMORY_LIMIT = 2
POLICY_VIOLATION = 3
OUTPUT_LIMIT = 4
INPUT_ERROR = 5
STATUSES = frozenset({OK, CODE_ERROR, MEMORY_LIMIT, POLICY_VIOLATION, OUTPUT_LIMIT, INPUT_ERROR})
ERROR_FIELDS = 4

_REPLY_HEAD = struct.Struct("<B16sBdQdBIII")
_FIELD = struct.Struct("<I")
MAX_LABEL_BYTES = 1024  # type labels, names and skip reasons are short by construction


class ProtocolError(Exception):
    """A worker sent bytes that do not follow this format."""


# --- requests (host -> worker) -------------------------------------------


def setup_request(env: dict[str, str]) -> tuple:
    return ("setup", env)


def run_request(
    token: bytes, code: str, inputs: dict[str, bytes], allow_await: bool, filename: str, cpu_time_s: float
) -> tuple:
    return ("run", token, code, inputs, allow_await, filename, cpu_time_s)


# --- frames ----------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameReader:
    """Whole frames from a blocking fd, with one read() per frame when it can.

    Only the worker uses it, on a channel whose sender is its trusted host.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def next(self) -> bytes | None:
        """The next payload, or None on a clean end of file."""
        buffer = self.buffer
        while True:
            missing = FRAME_HEADER.size
            if len(buffer) >= FRAME_HEADER.size:
                end = FRAME_HEADER.size + FRAME_HEADER.unpack_from(buffer)[0]
                if len(buffer) >= end:
                    payload = bytes(buffer[FRAME_HEADER.size : end])
                    del buffer[:end]
                    return payload
                missing = end - len(buffer)
            chunk = os.read(self.fd, max(missing, 1 << 16))
            if not chunk:
                if buffer:
                    raise EOFError("channel closed in the middle of a frame")
                return None
            buffer += chunk


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- hello (worker -> host, once, before any user code ran) -----------------


def encode_hello(layers: dict[str, str], error: str | None) -> bytes:
    return bytes([KIND_HELLO]) + json.dumps({"layers": layers, "error": error}).encode()


def decode_hello(payload: bytes) -> tuple[dict[str, str], str | None]:
    if len(payload) > MAX_HELLO_BYTES or not payload or payload[0] != KIND_HELLO:
        raise ProtocolError("expected a hello frame")
    try:
        body = json.loads(payload[1:])
        layers, error = body["layers"], body["error"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("malformed hello frame") from None
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
        raise ProtocolError("malformed hello frame")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("malformed hello frame")
    return layers, error


# --- replies (worker -> host, untrusted) -------------------------------------


@dataclass
class Reply:
    token: bytes
    status: int
    cpu_s: float
    peak_rss: int
    worker_cpu_s: float
    retire: bool
    outputs: list[tuple[str, str, bytes]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    error: tuple[str, str, str, str] | None = None


def encode_reply(reply: Reply) -> bytes:
    error = reply.error or ()
    parts = [
        _REPLY_HEAD.pack(
            KIND_REPLY,
            reply.token,
            reply.status,
            reply.cpu_s,
            reply.peak_rss,
            reply.worker_cpu_s,
            reply.retire,
            len(reply.outputs),
            len(reply.skipped),
            len(error),
        )
    ]

    def put(data: bytes) -> None:
        parts.append(_FIELD.pack(len(data)))
        parts.append(data)

    for name, label, blob in reply.outputs:
        put(name.encode())
        put(_text(label))
        put(blob)
    for name, reason in reply.skipped.items():
        put(name.encode())
        put(_text(reason))
    for text in error:
        put(_text(text))
    return b"".join(parts)


def _text(value: str) -> bytes:
    return value.encode("utf-8", "backslashreplace")


def clip_text(value: str, limit: int, keep_tail: bool = False) -> str:
    """``value`` cut so that its encoding on the wire takes at most ``limit`` bytes."""
    data = _text(value)
    if len(data) <= limit:
        return value
    data = data[-limit:] if keep_tail else data[:limit]
    return data.decode("utf-8", "ignore")


class _Cursor:
    __slots__ = ("pos", "view")

    def __init__(self, payload: bytes) -> None:
        self.view = memoryview(payload)
        self.pos = 0

    def field(self, limit: int) -> memoryview:
        end = self.pos + _FIELD.size
        if end > len(self.view):
            raise ProtocolError("reply truncated inside a field header")
        (length,) = _FIELD.unpack_from(self.view, self.pos)
        if length > limit:
            raise ProtocolError(f"reply field of {length} bytes exceeds its limit of {limit}")
        if end + length > len(self.view):
            raise ProtocolError("reply truncated inside a field")
        self.pos = end + length
        return self.view[end : self.pos]

    def text(self, limit: int) -> str:
        try:
            return str(self.field(limit), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("reply text is not UTF-8") from None

    def name(self) -> str:
        name = self.text(MAX_LABEL_BYTES)
        if not name.isidentifier():
            raise ProtocolError("reply names a variable that is not an identifier")
        return name


def decode_reply(payload: bytes, max_value_bytes: int, max_text_bytes: int) -> Reply:
    """Parse a reply frame; raise ProtocolError on any deviation at all."""
    if len(payload) < _REPLY_HEAD.size:
        raise ProtocolError("reply shorter than its header")
    (kind, token, status, cpu_s, peak_rss, worker_cpu_s, retire, n_outputs, n_skipped, n_error) = (
        _REPLY_HEAD.unpack_from(payload)
    )
    if kind != KIND_REPLY:
        raise ProtocolError(f"unexpected frame kind {kind}")
    if status not in STATUSES or retire not in (0, 1):
        raise ProtocolError("reply header holds an unknown status or flag")
    if n_error not in (0, ERROR_FIELDS) or (status == OK) != (n_error == 0):
        raise ProtocolError("reply error section does not match its status")
    if status != OK and n_outputs:
        raise ProtocolError("a failed run cannot carry outputs")
    # Every field costs at least its 4-byte header, which bounds the counts
    # by the payload size before we allocate anything for them.
    if (3 * n_outputs + 2 * n_skipped + n_error) * _FIELD.size > len(payload) - _REPLY_HEAD.size:
        raise ProtocolError("reply announces more fields than it holds")
    if not (0 <= cpu_s < math.inf and 0 <= worker_cpu_s < math.inf):  # also rejects NaN
        raise ProtocolError("reply carries a negative, infinite or NaN CPU time")

    cursor = _Cursor(payload)
    cursor.pos = _REPLY_HEAD.size
    reply = Reply(token, status, cpu_s, peak_rss, worker_cpu_s, bool(retire))
    seen: set[str] = set()
    for _ in range(n_outputs):
        name = cursor.name()
        label = cursor.text(MAX_LABEL_BYTES)
        blob = bytes(cursor.field(max_value_bytes))
        if name in seen:
            raise ProtocolError(f"reply names variable {name!r} twice")
        seen.add(name)
        reply.outputs.append((name, label, blob))
    for _ in range(n_skipped):
        name = cursor.name()
        reason = cursor.text(MAX_LABEL_BYTES)
        if name in seen:
            raise ProtocolError(f"reply names variable {name!r} twice")
        seen.add(name)
        reply.skipped[name] = reason
    if n_error:
        reply.error = tuple(cursor.text(max_text_bytes) for _ in range(ERROR_FIELDS))  # type: ignore[assignment]
    if cursor.pos != len(payload):
        raise ProtocolError("reply has trailing bytes")
    return reply
