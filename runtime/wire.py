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
    n_files I | n_skipped_files I | n_files x (path, data) | n_skipped_files x (path, reason)

where each field is ``[u32 len][bytes]``. Names are identifiers, labels and
reasons are UTF-8. The error fields are (type_name, message, traceback, detail).
File paths are UTF-8 and must pass :func:`safe_relative_path` on the host
too: they are data, never a path the host opens as they stand.
"""

from __future__ import annotations

import json
import math
import os
import select
import struct
from dataclasses import dataclass, field
from time import perf_counter  # bound at import: a run may replace time.perf_counter

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
FILES_LIMIT = 6  # ./out/ held more than max_out_files entries or max_out_files_bytes bytes; detail names which
STATUSES = frozenset({OK, CODE_ERROR, MEMORY_LIMIT, POLICY_VIOLATION, OUTPUT_LIMIT, INPUT_ERROR, FILES_LIMIT})
ERROR_FIELDS = 4

_REPLY_HEAD = struct.Struct("<B16sBdQdBIII")
_FILES_HEAD = struct.Struct("<II")
_FIELD = struct.Struct("<I")
MAX_LABEL_BYTES = 1024  # type labels, names and skip reasons are short by construction
MAX_PATH_BYTES = 4096  # PATH_MAX: no file a run leaves can have a longer relative path


class ProtocolError(Exception):
    """A worker sent bytes that do not follow this format."""


# --- requests (host -> worker) -------------------------------------------


def setup_request(env: dict[str, str]) -> tuple:
    return ("setup", env)


def run_request(
    token: bytes,
    code: str,
    inputs: dict[str, bytes],
    allow_await: bool,
    filename: str,
    cpu_time_s: float,
    files: dict[str, bytes],
) -> tuple:
    return ("run", token, code, inputs, allow_await, filename, cpu_time_s, files)


def safe_relative_path(path: object) -> bool:
    """A relative path that stays where it is put: no absolute part, no ``..``
    or ``.``, no empty component, no NUL, at most ``MAX_PATH_BYTES`` bytes.

    The one rule for a file's name in both directions: what the host sends in
    ``files=``, and what a worker names in its reply.
    """
    if not isinstance(path, str) or not path or "\0" in path or path.startswith("/"):
        return False
    try:
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            return False
    except UnicodeEncodeError:  # a lone surrogate: not a name any file system can be asked for
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


# --- frames ----------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameReader:
    """Whole frames from a blocking fd, with one read() per frame when it can.

    Only the worker uses it, on a channel whose sender is its trusted host.

    It waits in poll() for POLLIN rather than in read(): a task blocked in a
    Unix socket's read() is woken by every event on the socket, and the
    host's reading of our reply is one (the freed send buffer). That woke
    the idle worker once per run for nothing, a context switch on its CPU
    and a cross-CPU wake-up in the host's recv() (two switches per run
    counted in /proc/PID/status, one with the poll). poll() wakes only for
    data or the end of the channel.

    ``next(spin_s)`` first looks for data without sleeping for up to
    ``spin_s`` seconds, yielding the CPU between looks. On this kind of VM
    an idle vCPU halts, and waking it for the next request costs tens of
    microseconds, a fifth of a warm run (docs/BENCHMARKS.md, "Waiting for
    the next run"). A task that is still looking when the request lands
    needs no wake-up at all. ``sched_yield`` between looks hands the CPU to
    any other runnable task on it, so the look takes only time nobody else
    wanted. The caller decides when the look may pay (``runtime.worker``).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self._readable = select.poll()
        self._readable.register(fd, select.POLLIN)

    def next(self, spin_s: float = 0.0) -> bytes | None:
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
            if spin_s:
                self._look_for_data(spin_s)
                spin_s = 0.0
            self._readable.poll()
            chunk = os.read(self.fd, max(missing, 1 << 16))
            if not chunk:
                if buffer:
                    raise EOFError("channel closed in the middle of a frame")
                return None
            buffer += chunk

    def _look_for_data(self, spin_s: float) -> None:
        """Return when data is there, or after ``spin_s`` seconds, never sleeping meanwhile."""
        readable = self._readable.poll
        deadline = perf_counter() + spin_s
        while not readable(0) and perf_counter() < deadline:
            os.sched_yield()


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
    files: dict[str, bytes] = field(default_factory=dict)
    skipped_files: dict[str, str] = field(default_factory=dict)


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
    parts.append(_FILES_HEAD.pack(len(reply.files), len(reply.skipped_files)))
    for path, data in reply.files.items():
        put(_text(path))
        put(data)
    for path, reason in reply.skipped_files.items():
        put(_text(path))
        put(_text(reason))
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

    def path(self) -> str:
        path = self.text(MAX_PATH_BYTES)
        if not safe_relative_path(path):
            raise ProtocolError("reply names a file path that is absolute, climbs with '..' or is malformed")
        return path

    def name(self) -> str:
        name = self.text(MAX_LABEL_BYTES)
        if not name.isidentifier():
            raise ProtocolError("reply names a variable that is not an identifier")
        return name


def decode_reply(
    payload: bytes, max_value_bytes: int, max_text_bytes: int, max_files: int = 0, max_files_bytes: int = 0
) -> Reply:
    """Parse a reply frame; raise ProtocolError on any deviation at all.

    ``max_files`` and ``max_files_bytes`` bound the files section: a worker
    that sends more than its policy lets it collect is breaking the protocol.
    """
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
    _decode_files(cursor, reply, max_files, max_files_bytes)
    if cursor.pos != len(payload):
        raise ProtocolError("reply has trailing bytes")
    return reply


def _decode_files(cursor: _Cursor, reply: Reply, max_files: int, max_files_bytes: int) -> None:
    end = cursor.pos + _FILES_HEAD.size
    if end > len(cursor.view):
        raise ProtocolError("reply truncated before its files section")
    n_files, n_skipped = _FILES_HEAD.unpack_from(cursor.view, cursor.pos)
    cursor.pos = end
    if n_files + n_skipped > max_files:
        raise ProtocolError(f"reply carries {n_files + n_skipped} file entries, over the limit of {max_files}")
    if (n_files or n_skipped) and reply.status != OK:
        raise ProtocolError("a failed run cannot carry files")
    remaining = max_files_bytes
    for _ in range(n_files):
        path = cursor.path()
        data = bytes(cursor.field(remaining))
        remaining -= len(data)
        if path in reply.files:
            raise ProtocolError(f"reply names file {path!r} twice")
        reply.files[path] = data
    for _ in range(n_skipped):
        path = cursor.path()
        reason = cursor.text(MAX_LABEL_BYTES)
        # A path may be both returned and skipped: an ./out/ file and a rewritten input of the same name.
        if path in reply.skipped_files:
            raise ProtocolError(f"reply names skipped file {path!r} twice")
        reply.skipped_files[path] = reason
