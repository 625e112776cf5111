"""The module allowlist inside the worker: every import route, submodule rules, deny wins."""

from __future__ import annotations

import pathlib
import textwrap

import pytest
import pytest_asyncio

from sandbox import CodeError, InputError, PolicyViolation, Sandbox
from tests.conftest import quick_policy

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb():
    tenants = {
        "exact": quick_policy(allowed_modules=["json", "importlib", "asyncio"], denied_modules=["os"]),
        "subtree": quick_policy(allowed_modules=["json.*", "collections.*"], denied_modules=[]),
        "deny_wins": quick_policy(allowed_modules=["os", "os.path", "json"], denied_modules=["os"]),
    }
    async with Sandbox(tenants=tenants, workers=2) as sandbox:
        yield sandbox


@pytest.mark.parametrize(
    "code, module",
    [
        ("import os", "os"),
        ("import subprocess", "subprocess"),
        ("__import__('ctypes')", "ctypes"),
        ("from os import path", "os"),
        ("import os.path", "os.path"),
        ("exec('import socket', {})", "socket"),
        ("eval(\"__import__('sys')\")", "sys"),
        ("def f():\n    import pickle\nf()", "pickle"),
        ("class C:\n    import marshal", "marshal"),
        ("import email", "email"),
    ],
)
async def test_denied_or_unlisted_imports_raise_policy_violation(sb, code, module):
    with pytest.raises(PolicyViolation) as info:
        await sb.run(code)
    error = info.value
    assert error.module == module and error.tenant == "default"
    assert repr(module) in str(error) and "'default'" in str(error)


async def test_allowed_stdlib_modules_work_including_their_internal_imports(sb):
    code = textwrap.dedent("""
        import json, asyncio, decimal, statistics, datetime, re, collections, uuid, hashlib, random, csv, io
        data = json.loads(json.dumps({"a": [1, 2.5]}))
        mean = statistics.mean([1, 2, 3, 4])
        rounded = str(decimal.Decimal("1.005").quantize(decimal.Decimal("0.01")))
        words = collections.Counter(re.findall(r"\\w+", "a b a"))["a"]
        buf = io.StringIO()
        csv.writer(buf).writerow([1, "x"])
        line = buf.getvalue()
    """)
    r = await sb.run(code)
    assert r.outputs["data"] == {"a": [1, 2.5]}
    assert r.outputs["mean"] == 2.5 and r.outputs["rounded"] == "1.00"
    assert r.outputs["words"] == 2 and r.outputs["line"] == "1,x\r\n"


async def test_exact_entry_allows_only_that_module(sb):
    assert (await sb.run("import json\nok = json.dumps(1)", tenant="exact")).outputs == {"ok": "1"}
    with pytest.raises(PolicyViolation) as info:
        await sb.run("from json import decoder", tenant="exact")
    assert info.value.module == "json.decoder"
    with pytest.raises(PolicyViolation):
        await sb.run("import json.decoder", tenant="exact")


async def test_subtree_entry_allows_the_package_and_its_submodules(sb):
    r = await sb.run("from json import decoder\nimport collections.abc\nok = decoder.__name__", tenant="subtree")
    assert r.outputs == {"ok": "json.decoder"}


async def test_deny_wins_over_allow_and_covers_submodules(sb):
    for code in ("import os", "import os.path"):
        with pytest.raises(PolicyViolation):
            await sb.run(code, tenant="deny_wins")


async def test_importlib_import_module_is_checked_for_user_code(sb):
    with pytest.raises(PolicyViolation) as info:
        await sb.run("import importlib\nimportlib.import_module('os')", tenant="exact")
    assert info.value.module == "os"
    r = await sb.run("import importlib\nok = importlib.import_module('json').dumps([1])", tenant="exact")
    assert r.outputs == {"ok": "[1]"}


async def test_relative_imports_are_resolved_before_the_check(sb):
    with pytest.raises(PolicyViolation) as info:
        await sb.run("__package__ = 'json'\nfrom . import decoder", tenant="exact")
    assert info.value.module == "json.decoder"
    with pytest.raises(CodeError) as plain:
        await sb.run("from . import anything")
    assert plain.value.type_name in ("ImportError", "KeyError")


async def test_a_blocked_import_is_an_import_error_user_code_can_handle(sb):
    code = "try:\n    import numpy\nexcept ImportError as exc:\n    reason = str(exc)"
    r = await sb.run(code)
    assert "not allowed by the policy of tenant 'default'" in r.outputs["reason"]


async def test_inputs_cannot_smuggle_in_a_denied_module(sb):
    with pytest.raises(PolicyViolation) as info:
        await sb.run("x = p", {"p": pathlib.PurePosixPath("/etc")})
    assert info.value.module == "pathlib"


async def test_removed_builtins_are_gone(sb):
    for name in ("input", "breakpoint", "exit", "help"):
        with pytest.raises(CodeError) as info:
            await sb.run(f"{name}")
        assert info.value.type_name == "NameError"


async def test_builtins_edits_do_not_survive_into_the_next_run(sb):
    await sb.run("__builtins__['len'] = lambda x: 42")
    assert (await sb.run("n = len([1, 2])")).outputs == {"n": 2}


async def test_input_names_are_checked_on_the_host(sb):
    with pytest.raises(InputError):
        await sb.run("pass", {"__import__": 1})
