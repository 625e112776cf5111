"""Sandbox.stream: output delivered as written, failures after the output, text, limits, leaving early."""

from __future__ import annotations

import asyncio
import itertools
import textwrap
import time

import psutil
import pytest

from sandbox import CodeError, Output, OutputLimitExceeded, Sandbox, SandboxError, TimeLimitExceeded
from sandbox.policies.model import DEFAULT_ALLOWED_MODULES, DEFAULT_DENIED_MODULES
from tests.conftest import quick_policy

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Raw writes to fds 1 and 2 need os, which the default policy denies.
RAW_WRITES = quick_policy(
    allowed_modules=[*DEFAULT_ALLOWED_MODULES, "os"],
    denied_modules=[m for m in DEFAULT_DENIED_MODULES if m != "os"],
    max_output_bytes=1000,
)


async def collect(stream) -> list[Output]:
    return [out async for out in stream]


def joined(outputs: list[Output], name: str) -> str:
    return "".join(out.text for out in outputs if out.stream == name)


async def wait_gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.02)
    return False


async def busy_pid(sb: Sandbox) -> int:
    deadline = time.monotonic() + 5
    while not sb._running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return next(iter(sb._running.values())).pid


async def test_output_arrives_while_the_run_is_still_going(shared_sandbox):
    code = "import time\nprint('first')\ntime.sleep(3)\nprint('second')"
    loop = asyncio.get_running_loop()
    stream = shared_sandbox.stream(code)
    began = loop.time()
    received = []
    async for out in stream:
        received.append((loop.time() - began, out))
    (first_at, first), (second_at, second) = received
    assert (first.stream, first.text, second.text) == ("stdout", "first\n", "second\n")
    # Generous bounds for a loaded machine: the run sleeps 3 s after the first line, which must not wait for it.
    assert first_at < 2.0 and second_at > first_at + 1.0
    assert first.at < 2.0 and first.at + 1.0 < second.at <= stream.result.stats.wall_s
    assert stream.result.stdout == "first\nsecond\n"


async def test_result_output_is_exactly_the_streamed_pieces_and_matches_run():
    code = textwrap.dedent("""
        import os, time
        for i in range(50):
            print("out", i, "é" * (i % 3))
            if i % 7 == 0:
                os.write(2, f"err {i}\\n".encode())
                time.sleep(0.01)
        total = 50
    """)
    async with Sandbox(RAW_WRITES.model_copy(update={"max_output_bytes": 100_000}), workers=1) as sb:
        stream = sb.stream(code)
        outputs = await collect(stream)
        plain = await sb.run(code)
    assert len(outputs) >= 2
    assert joined(outputs, "stdout") == stream.result.stdout == plain.stdout
    assert (
        joined(outputs, "stderr")
        == stream.result.stderr
        == plain.stderr
        == "".join(f"err {i}\n" for i in range(0, 50, 7))
    )
    assert stream.result.outputs == plain.outputs == {"total": 50, "i": 49}
    assert all(later.at >= earlier.at for earlier, later in itertools.pairwise(outputs))


async def test_stdout_and_stderr_are_told_apart():
    async with Sandbox(RAW_WRITES, workers=1) as sb:
        code = "import os, time\nos.write(1, b'to out\\n')\ntime.sleep(0.2)\nos.write(2, b'to err\\n')"
        stream = sb.stream(code)
        outputs = await collect(stream)
        assert [(o.stream, o.text) for o in outputs] == [("stdout", "to out\n"), ("stderr", "to err\n")]
        assert (stream.result.stdout, stream.result.stderr) == ("to out\n", "to err\n")


async def test_a_failing_run_yields_every_piece_then_raises_what_run_raises(shared_sandbox):
    code = "import time\nprint('before')\ntime.sleep(0.2)\nprint('still')\nraise ValueError('boom')"
    stream = shared_sandbox.stream(code)
    outputs = []
    with pytest.raises(CodeError) as streamed:
        async for out in stream:
            outputs.append(out)
    with pytest.raises(CodeError) as plain:
        await shared_sandbox.run(code)
    assert joined(outputs, "stdout") == "before\nstill\n" == streamed.value.stdout == plain.value.stdout
    assert streamed.value.type_name == plain.value.type_name == "ValueError"
    assert str(streamed.value) == str(plain.value)
    assert stream.result is None


async def test_a_run_killed_at_its_wall_limit_still_delivers_what_it_wrote(shared_sandbox):
    outputs = []
    with pytest.raises(TimeLimitExceeded) as info:
        async for out in shared_sandbox.stream("print('alive')\nwhile True:\n    pass", timeout=0.5):
            outputs.append(out)
    assert joined(outputs, "stdout") == "alive\n" == info.value.stdout


async def test_a_character_split_across_writes_arrives_whole_and_bad_bytes_are_replaced():
    async with Sandbox(RAW_WRITES, workers=1) as sb:
        code = textwrap.dedent("""
            import os, time
            os.write(1, b"caf\\xc3")
            time.sleep(0.3)
            os.write(1, b"\\xa9 \\xe2\\x82")
            time.sleep(0.3)
            os.write(1, b"\\xac!\\n")
            os.write(2, b"bad \\xff\\xfe end \\xe2\\x82")
        """)
        stream = sb.stream(code)
        outputs = await collect(stream)
        assert joined(outputs, "stdout") == "café €!\n" == stream.result.stdout
        assert joined(outputs, "stderr") == "bad \ufffd\ufffd end \ufffd" == stream.result.stderr
        assert len([o for o in outputs if o.stream == "stdout"]) >= 2, "the pieces came as written"
        assert not any("\ufffd" in o.text for o in outputs if o.stream == "stdout")


async def test_the_output_cap_applies_as_for_run():
    async with Sandbox(RAW_WRITES, workers=1) as sb:
        code = "import time\nfor i in range(100):\n    print('x' * 99)\n    time.sleep(0.001)"
        outputs = []
        with pytest.raises(OutputLimitExceeded) as streamed:
            async for out in sb.stream(code):
                outputs.append(out)
        with pytest.raises(OutputLimitExceeded) as plain:
            await sb.run(code)
        assert joined(outputs, "stdout") == streamed.value.stdout == plain.value.stdout
        assert len(streamed.value.stdout) == 1000 == streamed.value.limit_bytes


async def test_a_consumer_that_does_not_read_holds_up_neither_the_run_nor_memory():
    async with Sandbox(RAW_WRITES, workers=1) as sb:
        stream = sb.stream("import time\nprint('start')\ntime.sleep(0.5)\nwhile True:\n    print('y' * 200)")
        iterator = aiter(stream)
        first = await anext(iterator)
        assert first.text == "start\n"
        # The consumer stops reading; the run still ends at its output cap on its own.
        start = time.monotonic()
        r = await sb.run("after = 1")  # needs the one worker: the flooding run must have ended
        assert r.outputs == {"after": 1} and time.monotonic() - start < 5
        # What waits for the consumer is the error's own captured output, not pieces of the stream's.
        backlog = stream._backlog
        assert backlog.entries and all(entry.pieces is None for entry in backlog.entries)
        rest = []
        with pytest.raises(OutputLimitExceeded) as info:
            while True:
                rest.append(await anext(iterator))
        held = len(first.text) + sum(len(out.text) for out in rest)
        assert held == 1000 == len(info.value.stdout)


async def test_breaking_out_of_the_loop_kills_the_run_and_frees_the_slot():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        async for out in sb.stream("import time\nprint('go')\ntime.sleep(60)"):
            pid = await busy_pid(sb)
            assert out.text == "go\n"
            break
        assert await wait_gone(pid)
        start = time.monotonic()
        r = await sb.run("x = 1")
        assert r.outputs == {"x": 1} and r.stats.worker_pid != pid
        assert time.monotonic() - start < 3.0


async def test_an_exception_in_the_loop_body_kills_the_run():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        pid = 0
        with pytest.raises(KeyError):
            async for _ in sb.stream("import time\nprint('go')\ntime.sleep(60)"):
                pid = await busy_pid(sb)
                raise KeyError("consumer failed")
        assert await wait_gone(pid)
        assert (await sb.run("x = 2")).outputs == {"x": 2}


async def test_cancelling_the_consuming_task_kills_the_run():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in sb.stream("import time\nprint('go')\ntime.sleep(60)"):
                started.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 5)
        pid = await busy_pid(sb)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_gone(pid)
        assert (await sb.run("x = 3")).outputs == {"x": 3}


async def test_aclose_kills_the_run_and_ends_the_loop():
    async with Sandbox(quick_policy(wall_time_s=30), workers=1) as sb:
        stream = sb.stream("import time\nprint('go')\ntime.sleep(60)")
        iterator = aiter(stream)
        await anext(iterator)
        pid = await busy_pid(sb)
        await stream.aclose()
        assert await wait_gone(pid)
        with pytest.raises(StopAsyncIteration):
            await anext(iterator)
        assert stream.result is None
        assert (await sb.run("x = 4")).outputs == {"x": 4}


async def test_a_stream_runs_when_iterated_and_only_once(shared_sandbox):
    stream = shared_sandbox.stream("print('once')")
    assert stream.result is None
    assert [out.text for out in await collect(stream)] == ["once\n"]
    with pytest.raises(SandboxError, match="only once"):
        await collect(stream)


async def test_admission_errors_come_from_the_loop(shared_sandbox):
    with pytest.raises(SandboxError, match="unknown tenant"):
        await collect(shared_sandbox.stream("x = 1", tenant="nobody"))
