"""Code-node semantics: inputs, outputs, skipped names, exceptions, captured output."""

from __future__ import annotations

import asyncio
import builtins
import textwrap

import pytest

from sandbox import CodeError, InputError, OutputLimitExceeded, Sandbox, SandboxError
from tests.conftest import quick_policy

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_inputs_are_variables_and_every_binding_is_an_output(shared_sandbox):
    r = await shared_sandbox.run("y = x * 2\nz = [x, y]\nname = 'n'", {"x": 21})
    assert r.outputs == {"y": 42, "z": [21, 42], "name": "n"}


async def test_inputs_not_rebound_are_not_echoed_but_rebound_ones_are(shared_sandbox):
    r = await shared_sandbox.run("a = a + 1\nc = b", {"a": 1, "b": 2})
    assert r.outputs == {"a": 2, "c": 2}


async def test_legacy_result_variable_is_an_ordinary_output(shared_sandbox):
    r = await shared_sandbox.run("result = {'data': [1, 2], 'count': 2}")
    assert r.outputs == {"result": {"data": [1, 2], "count": 2}}


async def test_functions_and_lambdas_can_be_inputs(shared_sandbox):
    def triple(v):
        return v * 3

    r = await shared_sandbox.run("out = f(4) + g(1)", {"f": triple, "g": lambda v: v + 100})
    assert r.outputs == {"out": 113}


@pytest.mark.parametrize("name", ["1x", "a-b", "class", "", "with space", "__builtins__", "__name__"])
async def test_invalid_input_names_are_refused_before_running(shared_sandbox, name):
    with pytest.raises(InputError, match="input name"):
        await shared_sandbox.run("pass", {name: 1})


async def test_unserializable_input_is_a_clear_input_error(shared_sandbox):
    import threading

    with pytest.raises(InputError, match="'lock' cannot be serialized"):
        await shared_sandbox.run("pass", {"lock": threading.Lock()})


async def test_top_level_await_and_prebound_asyncio(shared_sandbox):
    code = textwrap.dedent("""
        async def double(v):
            await asyncio.sleep(0.01)
            return v * 2
        values = await asyncio.gather(*(double(i) for i in range(5)))
    """)
    r = await shared_sandbox.run(code)
    assert r.outputs == {"values": [0, 2, 4, 6, 8]}
    assert r.skipped["double"] == "function"


async def test_one_namespace_for_functions_classes_and_comprehensions(shared_sandbox):
    code = textwrap.dedent("""
        factor = 3
        scaled = [v * factor for v in range(3)]
        def apply(v):
            return v + factor
        class Box:
            size = factor * 2
        applied = apply(1)
        box_size = Box.size
        nested = {k: [k * factor for _ in range(2)] for k in range(2)}
    """)
    r = await shared_sandbox.run(code)
    assert r.outputs["scaled"] == [0, 3, 6]
    assert r.outputs["applied"] == 4
    assert r.outputs["box_size"] == 6
    assert r.outputs["nested"] == {0: [0, 0], 1: [3, 3]}


async def test_multiline_strings_and_line_numbers_survive_compilation(shared_sandbox):
    code = 'text = """line one\n    line two\nline three"""\n\n\nraise ValueError(text.splitlines()[1])\n'
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run(code)
    assert info.value.type_name == "ValueError"
    assert "    line two" in info.value.remote_message
    assert 'File "<code>", line 6' in info.value.traceback


async def test_skipped_names_carry_their_reason(shared_sandbox):
    code = textwrap.dedent("""
        import json
        _private = 1
        def func(): pass
        class Klass: pass
        lam = lambda: 1
        coro = asyncio.sleep(0)
        coro.close()
        task = asyncio.ensure_future(asyncio.sleep(0))
        await task
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(1)
        lock = asyncio.Lock()
        sem = asyncio.Semaphore(2)
        gen = (i for i in range(3))
        handle = open("scratch.txt", "w")
        kept = 7
    """)
    r = await shared_sandbox.run(code)
    assert r.outputs == {"kept": 7}
    reasons = r.skipped
    assert reasons["json"] == "module"
    assert reasons["_private"].startswith("private name")
    assert reasons["func"] == reasons["lam"] == "function"
    assert reasons["Klass"] == "class"
    assert reasons["coro"] == reasons["task"] == reasons["fut"] == "coroutine, task or future"
    assert reasons["lock"] == reasons["sem"] == "lock, semaphore or other synchronization primitive"
    assert reasons["gen"] == "generator"
    assert reasons["handle"].startswith("cannot be serialized")


async def test_interpreter_managed_names_are_neither_outputs_nor_skipped(shared_sandbox):
    r = await shared_sandbox.run("x: int = 1\nimport warnings\nwarnings.warn('w')")
    assert r.outputs == {"x": 1}
    assert set(r.skipped) == {"warnings"}


async def test_code_error_names_the_remote_type_and_shows_only_user_frames(shared_sandbox):
    code = textwrap.dedent("""\
        def inner(v):
            return {}[v]

        def outer():
            return inner("missing")

        outer()
    """)
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run(code)
    error = info.value
    assert error.type_name == "KeyError"
    assert str(error).startswith("KeyError: 'missing'")
    assert 'File "<code>", line 7, in <module>' in error.traceback
    assert 'File "<code>", line 5, in outer' in error.traceback
    assert 'File "<code>", line 2, in inner' in error.traceback
    assert "runtime" not in error.traceback and "codenode" not in error.traceback


async def test_syntax_error_is_a_code_error_with_its_line(shared_sandbox):
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run("x = 1\ny = (\n")
    assert info.value.type_name == "SyntaxError"
    assert "line 2" in info.value.traceback


async def test_user_defined_exception_class(shared_sandbox):
    code = "class QuotaBlown(RuntimeError):\n    pass\nraise QuotaBlown('over')"
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run(code)
    assert info.value.type_name == "QuotaBlown"
    assert info.value.remote_message == "QuotaBlown: over"


async def test_every_builtin_exception_class_can_be_raised_and_caught(shared_sandbox):
    names = sorted(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException))
    code = textwrap.dedent("""
        special = {
            "UnicodeDecodeError": ("utf-8", b"x", 0, 1, "bad"),
            "UnicodeEncodeError": ("utf-8", "x", 0, 1, "bad"),
            "UnicodeTranslateError": ("x", 0, 1, "bad"),
            "BaseExceptionGroup": ("group", [ValueError()]),
            "ExceptionGroup": ("group", [ValueError()]),
        }
        caught = []
        for name in names:
            cls = __builtins__[name]
            try:
                raise cls(*special.get(name, ("boom",)))
            except cls:
                caught.append(name)
    """)
    r = await shared_sandbox.run(code, {"names": names})
    assert r.outputs["caught"] == names


@pytest.mark.parametrize(
    "exc",
    [
        "ValueError('v')",
        "KeyboardInterrupt()",
        "SystemExit(3)",
        "RecursionError()",
        "StopIteration()",
        "GeneratorExit()",
        "NotImplementedError('n')",
    ],
)
async def test_escaping_builtin_exceptions_become_code_errors(shared_sandbox, exc):
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run(f"raise {exc}")
    assert info.value.type_name == exc.split("(")[0]


async def test_captured_stdout_and_stderr_from_every_route():
    policy = quick_policy(allowed_modules=["sys", "os", "asyncio"], denied_modules=[])
    async with Sandbox(policy, workers=1) as sb:
        code = textwrap.dedent("""
            import sys, os
            print("via print")
            sys.stdout.write("via sys.stdout\\n")
            print("to stderr", file=sys.stderr)
            sys.stderr.write("via sys.stderr\\n")
            os.write(1, b"raw fd 1\\n")
            os.write(2, b"raw fd 2\\n")
            print("unterminated", end="")
        """)
        r = await sb.run(code)
    assert r.stdout.splitlines() == ["via print", "via sys.stdout", "raw fd 1", "unterminated"]
    assert r.stderr.splitlines() == ["to stderr", "via sys.stderr", "raw fd 2"]


async def test_output_limit_keeps_the_head(shared_sandbox):
    with pytest.raises(OutputLimitExceeded) as info:
        await shared_sandbox.run("for i in range(10**6):\n    print(f'line {i}')")
    error = info.value
    assert error.variable is None
    assert error.stdout.startswith("line 0\nline 1\n")
    assert len(error.stdout.encode()) == shared_sandbox.policies["default"].max_output_bytes


async def test_a_flood_on_both_pipes_ends_the_run_once_without_loop_errors(shared_sandbox):
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        for _ in range(5):
            with pytest.raises(OutputLimitExceeded):
                await shared_sandbox.run(
                    "err = open(2, 'w', closefd=False)\nwhile True:\n"
                    "    print('x' * 65536)\n    print('y' * 65536, file=err)"
                )
        assert (await shared_sandbox.run("ok = 1")).outputs == {"ok": 1}
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


async def test_output_of_a_failing_run_is_kept_on_the_error(shared_sandbox):
    with pytest.raises(CodeError) as info:
        await shared_sandbox.run("print('before')\nraise ValueError('x')")
    assert info.value.stdout == "before\n"


async def test_stats_are_filled_in(shared_sandbox):
    r = await shared_sandbox.run("total = sum(range(100000))")
    assert r.stats.wall_s > 0 and r.stats["wall_s"] == r.stats.wall_s
    assert r.stats.cpu_s > 0
    assert r.stats.peak_memory_bytes > 1 << 20
    assert r.stats.worker_pid > 1 and r.stats.tenant == "default"


async def test_unknown_tenant_is_a_clear_error(shared_sandbox):
    with pytest.raises(SandboxError, match="unknown tenant 'nobody'"):
        await shared_sandbox.run("x = 1", tenant="nobody")


async def test_scratch_space_is_the_cwd_and_is_emptied_between_runs(shared_sandbox):
    await shared_sandbox.run("with open('note.txt', 'w') as f:\n    f.write('hi')")
    code = "try:\n    open('note.txt').read()\n    seen = True\nexcept OSError:\n    seen = False"
    assert (await shared_sandbox.run(code)).outputs["seen"] is False


async def test_peak_memory_is_measured_per_run(shared_sandbox):
    big = await shared_sandbox.run("block = bytearray(96 * 2**20)\nsize = len(block)\ndel block")
    small = await shared_sandbox.run("y = 1")
    assert big.stats.peak_memory_bytes > 96 * 2**20
    assert small.stats.peak_memory_bytes < big.stats.peak_memory_bytes - 64 * 2**20
