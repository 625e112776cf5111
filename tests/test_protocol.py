"""The worker -> host protocol: bounded frames, a fresh token per run, a reply
decoder that trusts nothing, and a worker that is killed for any deviation.

Unit tests feed ``runtime.wire.decode_reply`` hand-made payloads. The others
run user code that writes straight to its channel (fd 3), as a worker taken
over by its own run would.
"""

from __future__ import annotations

import asyncio
import gc
import math
import socket
import struct
import textwrap
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import pytest_asyncio

from sandbox import CodeError, Opaque, PolicyViolation, Sandbox, SandboxError, WorkerCrashed
from sandbox.profile import max_frame_bytes
from sandbox.runtime import wire
from tests.conftest import HOSTILE, quick_policy
from tests.test_snapshot import BOMBS, HUGE_MEMO_INDEX, RunsACommand

in_module_loop = pytest.mark.asyncio(loop_scope="module")

MiB = 1024 * 1024
OPEN_POLICY = quick_policy(
    allowed_modules=["os", "sys", "time", "asyncio"], denied_modules=[], max_result_bytes=4 * MiB
)
NO_HANG_S = 3.0  # well under the policy's 5 s wall limit
LATE_REPLY_S = 0.3  # time for a forging run's own, late, reply to reach the host

# The documented reply layout, rebuilt here independently of the encoder.
HEAD = struct.Struct("<B16sBdQdBIII")
MAX_FILES = 4
MAX_FILES_BYTES = 64
TOKEN = bytes(range(16))
MAX_VALUE = 1000
MAX_TEXT = 500

# User code that reads its own run's token from the worker's stack and forges
# replies with it, exactly what a hostile run can do.
FORGER = textwrap.dedent("""
    import os, sys

    def _token():
        frame = sys._getframe()
        while frame is not None:
            token = frame.f_locals.get("token")
            if type(token) is bytes and len(token) == 16:
                return token
            frame = frame.f_back
        raise LookupError("no token on the stack")

    def _reply(outputs, token=None, cpu_s=0.0, files=None):
        w = sys.modules["sandbox.runtime.wire"]
        reply = w.Reply(token or _token(), w.OK, cpu_s, 0, 0.0, False, outputs, {}, None, files or {})
        return w.frame(w.encode_reply(reply))
""")


def _blob(value: object) -> bytes:
    return cloudpickle.dumps(value, protocol=5)


# --- decode_reply ----------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _payload(
    outputs: tuple = (),
    skipped: tuple = (),
    error: tuple = (),
    *,
    kind: int = wire.KIND_REPLY,
    status: int = wire.OK,
    cpu_s: float = 0.5,
    worker_cpu_s: float = 1.0,
    retire: int = 0,
    counts: tuple[int, int, int] | None = None,
    files: tuple = (),
    skipped_files: tuple = (),
) -> bytes:
    """A reply payload from raw byte fields: (name, label, blob), (name, reason), error texts,
    then the files section: (path, data), (path, reason)."""
    n_outputs, n_skipped, n_error = counts or (len(outputs), len(skipped), len(error))
    head = HEAD.pack(kind, TOKEN, status, cpu_s, 1 << 20, worker_cpu_s, retire, n_outputs, n_skipped, n_error)
    fields = [part for group in (*outputs, *skipped) for part in group] + list(error)
    files_head = struct.pack("<II", len(files), len(skipped_files))
    file_fields = [part for group in (*files, *skipped_files) for part in group]
    return (
        head + b"".join(_field(part) for part in fields) + files_head + b"".join(_field(part) for part in file_fields)
    )


def _decode(payload: bytes, max_files: int = MAX_FILES, max_files_bytes: int = MAX_FILES_BYTES) -> wire.Reply:
    return wire.decode_reply(payload, MAX_VALUE, MAX_TEXT, max_files, max_files_bytes)


def _refused(payload: bytes) -> str:
    with pytest.raises(wire.ProtocolError) as info:
        _decode(payload)
    return str(info.value)


OK_REPLY = _payload(outputs=((b"a", b"int", b"\x01\x02"), (b"b", b"list", b"")), skipped=((b"f", b"function"),))
FAILED_REPLY = _payload(status=wire.CODE_ERROR, error=(b"ValueError", b"ValueError: x", b"Traceback...", b""))


def test_well_formed_replies_decode_to_what_the_encoder_wrote():
    reply = wire.Reply(
        TOKEN,
        wire.OK,
        0.25,
        4096,
        1.5,
        True,
        [("x", "int", b"\x80\x05K\x01."), ("y", "str", b"")],
        {"f": "function"},
        None,
    )
    assert _decode(wire.encode_reply(reply)) == reply
    failed = wire.Reply(TOKEN, wire.OUTPUT_LIMIT, 0.0, 0, 0.0, False, [], {}, ("T", "message", "tb", "x"))
    assert _decode(wire.encode_reply(failed)) == failed
    assert _decode(OK_REPLY).outputs == [("a", "int", b"\x01\x02"), ("b", "list", b"")]


def test_the_files_section_round_trips_within_its_limits():
    reply = wire.Reply(TOKEN, wire.OK, 0.0, 0, 0.0, False, [], {}, None, {"a/b.txt": b"x" * 10}, {"f": "FIFO"})
    assert _decode(wire.encode_reply(reply)) == reply
    with_files = _payload(files=((b"a", b"1"), (b"b", b"2")), skipped_files=((b"c", b"socket (never read)"),))
    assert _decode(with_files).files == {"a": b"1", "b": b"2"}


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (_payload(files=((b"../../etc/x", b""),)), "climbs with '..'"),
        (_payload(files=((b"/etc/passwd", b""),)), "is absolute"),
        (_payload(files=((b"a//b", b""),)), "malformed"),
        (_payload(skipped_files=((b"./x", b"FIFO"),)), "malformed"),
        (_payload(files=((b"a", b""), (b"a", b""))), "reply names file 'a' twice"),
        (_payload(skipped_files=((b"a", b"FIFO"), (b"a", b"FIFO"))), "reply names skipped file 'a' twice"),
        (_payload(files=tuple((str(i).encode(), b"") for i in range(MAX_FILES + 1))), "file entries, over the limit"),
        (_payload(files=((b"a", b"x" * 40), (b"b", b"x" * 40))), "exceeds its limit"),
        (_payload(status=wire.CODE_ERROR, error=(b"E", b"m", b"", b""), files=((b"a", b""),)), "cannot carry files"),
    ],
    ids=["climbs", "absolute", "empty_part", "dot", "twice", "twice_skipped", "count", "bytes", "failed_run"],
)
def test_a_files_section_past_its_rules_is_refused(payload, fragment):
    assert fragment in _refused(payload)


@pytest.mark.parametrize("payload", [OK_REPLY, FAILED_REPLY], ids=["ok", "failed"])
def test_every_truncation_is_refused(payload):
    assert _decode(payload)
    for size in range(len(payload)):
        _refused(payload[:size])


@pytest.mark.parametrize("payload", [OK_REPLY, FAILED_REPLY], ids=["ok", "failed"])
def test_trailing_bytes_are_refused(payload):
    assert _refused(payload + b"\x00") == "reply has trailing bytes"


def test_fields_are_bounded_by_their_limits():
    assert _decode(_payload(outputs=((b"v", b"bytes", b"x" * MAX_VALUE),))).outputs[0][2] == b"x" * MAX_VALUE
    assert "exceeds its limit" in _refused(_payload(outputs=((b"v", b"bytes", b"x" * (MAX_VALUE + 1)),)))
    assert "exceeds its limit" in _refused(_payload(outputs=((b"v", b"L" * (wire.MAX_LABEL_BYTES + 1), b""),)))
    assert "exceeds its limit" in _refused(_payload(skipped=((b"v", b"r" * (wire.MAX_LABEL_BYTES + 1)),)))
    long_error = (b"T", b"m" * (MAX_TEXT + 1), b"", b"")
    assert "exceeds its limit" in _refused(_payload(status=wire.CODE_ERROR, error=long_error))


def test_a_length_beyond_the_payload_is_refused_without_reading_it():
    payload = HEAD.pack(wire.KIND_REPLY, TOKEN, wire.OK, 0.0, 0, 0.0, 0, 1, 0, 0) + struct.pack("<I", 0xFFFFFFFF)
    assert "exceeds its limit" in _refused(payload + b"\x00" * 8)
    short_blob = _field(b"a") + _field(b"int") + struct.pack("<I", 10) + b"short"
    assert _refused(payload[:-4] + short_blob) == "reply truncated inside a field"


def test_counts_larger_than_the_payload_are_refused_before_anything_is_allocated():
    start = time.perf_counter()
    for counts in ((0xFFFFFFFF, 0, 0), (0, 0xFFFFFFFF, 0), (1, 0, 0)):
        assert _refused(_payload(counts=counts)) == "reply announces more fields than it holds"
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "outputs, skipped",
    [
        (((b"a", b"int", b""), (b"a", b"int", b"")), ()),
        (((b"a", b"int", b""),), ((b"a", b"function"),)),
        ((), ((b"f", b"function"), (b"f", b"module"))),
    ],
    ids=["two_outputs", "output_and_skipped", "two_skipped"],
)
def test_a_variable_named_twice_is_refused(outputs, skipped):
    assert "twice" in _refused(_payload(outputs=outputs, skipped=skipped))


@pytest.mark.parametrize("where", ["name", "label", "reason", "error"])
def test_text_that_is_not_utf8_is_refused(where):
    bad = b"\xff\xfe"
    payload = {
        "name": _payload(outputs=((bad, b"int", b""),)),
        "label": _payload(outputs=((b"a", bad, b""),)),
        "reason": _payload(skipped=((b"a", bad),)),
        "error": _payload(status=wire.CODE_ERROR, error=(b"T", bad, b"", b"")),
    }[where]
    assert _refused(payload) == "reply text is not UTF-8"


@pytest.mark.parametrize("name", [b"1x", b"a-b", b"", b"a b", b"x\x00"])
def test_names_must_be_identifiers(name):
    assert "not an identifier" in _refused(_payload(outputs=((name, b"int", b""),)))


@pytest.mark.parametrize("which", ["cpu_s", "worker_cpu_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_cpu_times_must_be_finite_and_non_negative(which, value):
    assert "CPU time" in _refused(_payload(**{which: value}))


@pytest.mark.parametrize(
    "payload",
    [
        _payload(kind=wire.KIND_HELLO),
        _payload(kind=0),
        _payload(status=99),
        _payload(retire=2),
        _payload(error=(b"", b"", b"", b"")),
        _payload(status=wire.CODE_ERROR),
        _payload(status=wire.CODE_ERROR, error=(b"", b"", b"")),
        _payload(status=wire.CODE_ERROR, outputs=((b"a", b"int", b""),), error=(b"", b"", b"", b"")),
        HEAD.pack(wire.KIND_REPLY, TOKEN, wire.OK, 0.0, 0, 0.0, 0, 0, 0, 0)[:-1],
        b"",
    ],
    ids=[
        "hello_kind",
        "zero_kind",
        "unknown_status",
        "retire_flag",
        "ok_with_error",
        "error_without_text",
        "three_error_fields",
        "failed_with_outputs",
        "short_header",
        "empty",
    ],
)
def test_a_header_that_contradicts_itself_is_refused(payload):
    _refused(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x02{}",
        bytes([wire.KIND_HELLO]) + b"not json",
        bytes([wire.KIND_HELLO]) + b'{"layers": [], "error": null}',
        bytes([wire.KIND_HELLO]) + b'{"layers": {"a": 1}, "error": null}',
        bytes([wire.KIND_HELLO]) + b" " * wire.MAX_HELLO_BYTES + b'{"layers": {}, "error": null}',
    ],
    ids=["empty", "reply_kind", "not_json", "layers_list", "layer_not_text", "oversized"],
)
def test_a_malformed_hello_is_refused(payload):
    with pytest.raises(wire.ProtocolError):
        wire.decode_hello(payload)


# --- the worker's reader: looking for a request before sleeping -------------------------


@pytest.fixture
def channel():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


def test_a_request_already_there_is_read_at_once_when_looking(channel):
    ours, theirs = channel
    theirs.sendall(wire.frame(b"first") + wire.frame(b"second"))
    reader = wire.FrameReader(ours.fileno())
    assert reader.next(0.5) == b"first"
    started = time.perf_counter()
    assert reader.next(0.5) == b"second"
    assert time.perf_counter() - started < 0.25  # taken from the buffer, not looked for


def test_a_request_after_the_look_is_waited_for_asleep(channel):
    ours, theirs = channel
    reader = wire.FrameReader(ours.fileno())
    sender = threading.Timer(0.3, theirs.sendall, (wire.frame(b"late"),))
    sender.start()
    started_cpu, started = time.thread_time(), time.perf_counter()
    try:
        assert reader.next(0.01) == b"late"
    finally:
        sender.join()
    assert time.perf_counter() - started >= 0.25
    assert time.thread_time() - started_cpu < 0.1  # looked for 10 ms, then slept


def test_the_end_of_the_channel_during_the_look_ends_the_reader(channel):
    ours, theirs = channel
    reader = wire.FrameReader(ours.fileno())
    threading.Timer(0.005, theirs.shutdown, (socket.SHUT_WR,)).start()
    assert reader.next(1.0) is None


# --- frames from user code ----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_sandbox():
    """Two workers whose runs may import os and sys; OS confinement still applies."""
    async with Sandbox(OPEN_POLICY, workers=2) as sb:
        yield sb


async def _assert_healthy(sb: Sandbox, tenant: str = "default") -> None:
    runs = [sb.run("y = x * 2", {"x": i}, tenant=tenant) for i in range(4)]
    assert [r.outputs for r in await asyncio.gather(*runs)] == [{"y": i * 2} for i in range(4)]


async def _violation(sb: Sandbox, code: str, inputs: dict | None = None) -> WorkerCrashed:
    with pytest.raises(WorkerCrashed) as info:
        await sb.run(FORGER + code, inputs)
    error = info.value
    assert error.protocol_violation is True
    assert str(error).startswith("worker was killed for a protocol violation: ")
    return error


VIOLATIONS = {
    "garbage": ('os.write(3, (100).to_bytes(4, "little") + b"g" * 100)', "unexpected frame kind 103"),
    "short": ('os.write(3, b"\\x05\\x00\\x00\\x00hello")', "reply shorter than its header"),
    "oversized": ('os.write(3, b"\\xff\\xff\\xff\\xff")', "it announced a frame of 4294967295 bytes"),
    "over_policy_frame_limit": (
        f'os.write(3, ({max_frame_bytes(OPEN_POLICY) + 1}).to_bytes(4, "little"))',
        f"a frame of {max_frame_bytes(OPEN_POLICY) + 1} bytes, over the limit of",
    ),
    "truncated": ('os.write(3, (64).to_bytes(4, "little") + b"x" * 10)', "unexpected frame kind 120"),
    "hello_again": (
        'w = sys.modules["sandbox.runtime.wire"]\nos.write(3, w.frame(w.encode_hello({"x": "on" * 40}, None)))',
        "unexpected frame kind 1",
    ),
    "wrong_token": ("os.write(3, _reply([], token=os.urandom(16)))", "its reply carries the wrong token"),
    "name_twice": ('os.write(3, _reply([("a", "int", b""), ("a", "int", b"")]))', "reply names variable 'a' twice"),
    "value_over_cap": (f'os.write(3, _reply([("a", "bytes", b"x" * {4 * MiB + 1})]))', "exceeds its limit"),
    "nan_cpu_time": ('os.write(3, _reply([], cpu_s=float("nan")))', "CPU time"),
    # Paths a hostile worker names for Result.files: refused before anything on the host sees them.
    "file_path_climbs": ('os.write(3, _reply([], files={"../../etc/x": b"x"}))', "climbs with '..'"),
    "file_path_absolute": ('os.write(3, _reply([], files={"/etc/x": b"x"}))', "is absolute"),
    "file_path_nul": ('os.write(3, _reply([], files={"a\\0b": b"x"}))', "malformed"),
    "files_over_count": (
        f"os.write(3, _reply([], files={{str(i): b'' for i in range({OPEN_POLICY.max_out_files + 1})}}))",
        f"over the limit of {OPEN_POLICY.max_out_files}",
    ),
    "files_over_bytes": (
        f'os.write(3, _reply([], files={{"a": b"x" * {OPEN_POLICY.max_out_files_bytes + 1}}}))',
        "exceeds its limit",
    ),
}


@in_module_loop
@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_a_bad_frame_on_the_channel_kills_the_worker_and_only_its_run(open_sandbox, name):
    code, detail = VIOLATIONS[name]
    error = await _violation(open_sandbox, f"print('before')\n{code}\nafter = 1")
    assert detail in str(error)
    assert error.stdout == "before\n"
    await _assert_healthy(open_sandbox)


@in_module_loop
async def test_every_run_gets_a_fresh_token_and_a_replayed_one_is_refused():
    async with Sandbox(OPEN_POLICY, workers=1) as sb:
        first = await sb.run(FORGER + "seen = _token()")
        second = await sb.run(FORGER + "seen = _token()")
        assert first.stats.worker_pid == second.stats.worker_pid
        assert len(first.outputs["seen"]) == wire.TOKEN_BYTES and first.outputs["seen"] != second.outputs["seen"]
        error = await _violation(sb, "os.write(3, _reply([], token=old))", {"old": second.outputs["seen"]})
        assert "its reply carries the wrong token" in str(error)
        await _assert_healthy(sb)


@in_module_loop
async def test_a_violation_never_reaches_concurrent_runs_or_other_tenants():
    async with Sandbox(OPEN_POLICY, tenants={"other": quick_policy()}, workers=3) as sb:
        violation = asyncio.ensure_future(_violation(sb, 'import time\ntime.sleep(0.2)\nos.write(3, b"\\xff" * 4)'))
        slow = [
            sb.run("import time\ntime.sleep(0.1)\ny = x + 1", {"x": i}, tenant=t)
            for i, t in enumerate(["default", "other"] * 3)
        ]
        results = await asyncio.gather(*slow)
        assert [r.outputs for r in results] == [{"y": i + 1} for i in range(6)]
        await violation
        await _assert_healthy(sb)
        await _assert_healthy(sb, "other")


@in_module_loop
@pytest.mark.parametrize("copies", [1, 2], ids=["once", "twice"])
async def test_a_forged_reply_with_the_right_token_is_at_worst_a_lie_about_its_own_run(copies):
    code = FORGER + f"frame = _reply([('answer', 'int', {_blob(42)!r})])\nos.write(3, frame * {copies})\nanswer = 1"
    async with Sandbox(OPEN_POLICY, workers=1) as sb:
        forged = await sb.run(code)
        assert forged.outputs == {"answer": 42}
        await asyncio.sleep(LATE_REPLY_S)  # its genuine reply arrives late and gets the worker killed
        after = await sb.run("answer = 7")
        assert after.outputs == {"answer": 7}
        assert after.stats.worker_pid != forged.stats.worker_pid


@in_module_loop
async def test_forged_replies_carrying_pickle_bombs_leave_the_host_up_and_inert(open_sandbox, tmp_path: Path):
    canary = tmp_path / "host-only" / "canary"
    canary.parent.mkdir(mode=0o700)
    # The reply's outputs share one decoding budget, spent in order: the benign one goes first.
    blobs = {"huge_memo_index": HUGE_MEMO_INDEX}
    blobs.update({name: BOMBS[name][0] for name in ("deep_tuples", "doubling_list_chain", "uuid_with_deep_int_as_key")})
    blobs["poisoned"] = _blob(RunsACommand(str(canary)))
    code = "os.write(3, _reply([(name, 'bomb', blob) for name, blob in blobs.items()]))\nanswer = 1"
    r = await open_sandbox.run(FORGER + code, {"blobs": blobs})
    assert r.outputs.pop("huge_memo_index") == "kept"
    assert set(r.outputs) == set(blobs) - {"huge_memo_index"}
    for name, value in r.outputs.items():
        assert isinstance(value, Opaque) and value.data == blobs[name]
        assert repr(value) == f"<Opaque bomb ({len(blobs[name])} bytes)>"
    del r
    gc.collect()
    assert not canary.exists()
    await asyncio.sleep(LATE_REPLY_S)
    await _assert_healthy(open_sandbox)


@in_module_loop
@pytest.mark.parametrize(
    "code, survives",
    [
        ("os.close(0)", True),
        ("os.close(1)", True),
        ("os.close(2)", True),
        ("os.close(1)\nos.close(2)\nos.close(0)", True),
        ("os.close(3)", False),
        ("for fd in range(4):\n    os.close(fd)", False),
        ("os.dup2(os.open('/dev/null', os.O_WRONLY), 3)", False),
    ],
    ids=["stdin", "stdout", "stderr", "all_standard", "channel", "everything", "channel_replaced"],
)
async def test_closing_a_standard_stream_or_the_channel_ends_promptly(code, survives):
    async with Sandbox(OPEN_POLICY, workers=1) as sb:
        start = time.monotonic()
        try:
            outcome: object = await sb.run(f"import os\n{code}\nafter = 1")
        except SandboxError as exc:
            outcome = exc
        assert time.monotonic() - start < NO_HANG_S
        if survives:
            assert outcome.outputs == {"after": 1}
        else:
            assert isinstance(outcome, WorkerCrashed) and not outcome.protocol_violation
            assert "closed or replaced its channel to the supervisor" in str(outcome)
        await _assert_healthy(sb)


@in_module_loop
@pytest.mark.parametrize("fd", [1, 2], ids=["stdout", "stderr"])
async def test_a_run_that_closed_stdout_or_stderr_does_not_break_the_next_run(fd):
    async with Sandbox(OPEN_POLICY, workers=1) as sb:
        await sb.run(f"import os\nos.close({fd})")
        r = await sb.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\ndone = 1")
    assert (r.outputs, r.stdout, r.stderr) == ({"done": 1}, "out\n", "err\n")


@in_module_loop
async def test_hostile_forge_reply():
    path = HOSTILE / "forge_reply.py"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    code = path.read_text()
    expected = {
        name.strip()
        for line in code.splitlines()
        if line.startswith("# expect:")
        for name in line.partition(":")[2].split(",")
    }
    async with Sandbox(quick_policy(), workers=1) as sb:
        try:
            outcome: object = await sb.run(code)
        except (CodeError, PolicyViolation, WorkerCrashed) as exc:
            outcome = exc
        assert ("ok" if not isinstance(outcome, BaseException) else type(outcome).__name__) in expected
        if not isinstance(outcome, BaseException):
            assert outcome.outputs["marker"] == "genuine" and "status" not in outcome.outputs
        await _assert_healthy(sb)


# A run that forges its own reply (its token is in its own memory) is still
# running when the host takes that reply for its end. On a reused worker it
# could then read the next request and answer it: a process that runs user
# code cannot keep a secret from it. The guarantee is therefore drawn at the
# worker's edge: never another tenant's run, never another worker, and never
# the next run at all with fresh_process_per_run (README, "Code-node semantics").
STEAL_THE_NEXT_REQUEST = textwrap.dedent("""
    os.write(3, _reply([]))
    size = int.from_bytes(os.read(3, 4), "little")
    request = sys.modules["pickle"].loads(os.read(3, size))
    os.write(3, _reply([("answer", "str", sys.modules["cloudpickle"].dumps(repr(request[3])))], request[1]))
""")


@in_module_loop
@pytest.mark.parametrize(
    "tenants, victim_tenant",
    [
        ({"thief": OPEN_POLICY, "victim": quick_policy()}, "victim"),
        ({"thief": OPEN_POLICY.model_copy(update={"fresh_process_per_run": True})}, "thief"),
    ],
    ids=["another_tenant", "same_tenant_fresh_process"],
)
async def test_a_run_that_forged_its_reply_never_sees_or_answers_a_run_it_must_not(tenants, victim_tenant):
    async with Sandbox(tenants=tenants, workers=1) as sb:
        thief = asyncio.ensure_future(sb.run(FORGER + STEAL_THE_NEXT_REQUEST, tenant="thief"))
        await asyncio.sleep(0)
        victim = sb.run("answer = secret * 2", {"secret": "B-secret"}, tenant=victim_tenant)
        results = await asyncio.gather(thief, victim, return_exceptions=True)
    answered = results[1]
    assert not isinstance(answered, BaseException) and answered.outputs == {"answer": "B-secretB-secret"}
