"""``sandbox shell`` through a real pseudo-terminal: state, await, streaming, errors, lost sessions, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest

from sandbox.shell import with_echo

SANDBOX = str(Path(sys.executable).parent / "sandbox")
PROMPT = "\r\n>>> "


def spawn(*args: str, tmp_policy: Path | None = None) -> pexpect.spawn:
    argv = ["shell", *args]
    if tmp_policy is not None:
        argv += ["--policy", str(tmp_policy)]
    child = pexpect.spawn(SANDBOX, argv, encoding="utf-8", timeout=30, env={**os.environ, "TERM": "dumb"})
    child.expect(r"sandbox shell: tenant '\w+'")
    child.expect(">>> ")
    return child


def send(child: pexpect.spawn, line: str) -> None:
    child.sendline(line)
    child.expect_exact(line)  # the terminal's echo of what was typed


@pytest.fixture
def shell() -> Iterator[pexpect.spawn]:
    child = spawn()
    yield child
    child.close(force=True)


def test_state_await_echo_and_multi_line_input(shell):
    send(shell, "import math")
    shell.expect_exact(">>> ")
    send(shell, "x = await asyncio.sleep(0, result=21)")
    shell.expect_exact(">>> ")
    send(shell, "x * 2")
    shell.expect_exact("\r\n42" + PROMPT)
    send(shell, "for i in range(3):")
    shell.expect_exact("... ")
    send(shell, "    print(i * x, math.pi > 3)")
    shell.expect_exact("... ")
    send(shell, "")
    shell.expect_exact("\r\n0 True\r\n21 True\r\n42 True" + PROMPT)
    send(shell, "None")
    shell.expect_exact(PROMPT)
    assert shell.before.strip() == "", "None is not echoed"


def test_output_streams_as_it_is_written(shell):
    send(shell, "import time")
    shell.expect_exact(">>> ")
    send(shell, "print('tick'); time.sleep(3); print('tock')")
    start = time.monotonic()
    shell.expect_exact("\r\ntick\r\n")
    first = time.monotonic() - start
    shell.expect_exact("tock" + PROMPT)
    assert first < 2.0, "the first line waited for the end of the run"
    assert time.monotonic() - start >= 2.5


def test_an_error_prints_type_and_message_and_the_session_goes_on(shell):
    send(shell, "x = 1")
    shell.expect_exact(">>> ")
    send(shell, "1 / 0")
    shell.expect_exact('File "<shell>", line 1')
    shell.expect_exact("ZeroDivisionError: division by zero" + PROMPT)
    send(shell, "import socket")
    shell.expect("PolicyViolation: .*socket")
    shell.expect_exact(PROMPT)
    send(shell, "x + 1")
    shell.expect_exact("\r\n2" + PROMPT)
    send(shell, "1 +")
    shell.expect_exact("SyntaxError: invalid syntax")
    shell.expect_exact(PROMPT)


def test_a_lost_session_is_reported_and_a_new_one_started(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[tenants.default]\nwall_time_s = 1.0\n")
    child = spawn(tmp_policy=policy)
    try:
        send(child, "x = 1")
        child.expect_exact(">>> ")
        send(child, "while True: pass")
        child.expect_exact("... ")
        send(child, "")
        child.expect_exact("TimeLimitExceeded: run exceeded its wall-clock limit of 1 s")
        child.expect_exact("the session was lost: run 2 ended the session: TimeLimitExceeded")
        child.expect_exact("starting a new session" + PROMPT)
        send(child, "x")
        child.expect_exact("NameError: name 'x' is not defined" + PROMPT)
        send(child, "y = 3")
        child.expect_exact(">>> ")
        send(child, "y")
        child.expect_exact("\r\n3" + PROMPT)
    finally:
        child.close(force=True)


def test_ctrl_c_interrupts_the_run_and_starts_a_new_session(shell):
    send(shell, "x = 5")
    shell.expect_exact(">>> ")
    send(shell, "import time; time.sleep(60)")
    time.sleep(1.0)
    shell.sendintr()
    shell.expect_exact("KeyboardInterrupt")
    shell.expect_exact("the session was lost")
    shell.expect_exact("starting a new session" + PROMPT)
    send(shell, "y = 6")
    shell.expect_exact(">>> ")
    send(shell, "y")
    shell.expect_exact("\r\n6" + PROMPT)
    shell.sendintr()  # at the prompt: a fresh line, the session stays
    shell.expect_exact("KeyboardInterrupt" + PROMPT)
    send(shell, "y")
    shell.expect_exact("\r\n6" + PROMPT)


def test_ctrl_d_ends_it_and_leaves_no_process(shell):
    send(shell, "x = 1")
    shell.expect_exact(">>> ")
    processes = psutil.Process(shell.pid).children(recursive=True)
    assert processes, "the shell should have a zygote and workers below it"
    shell.sendeof()
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_an_unknown_tenant_is_a_usage_error():
    child = pexpect.spawn(SANDBOX, ["shell", "--tenant", "nobody"], encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "nobody" in child.before


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("x = 1", "x = 1"),
        ("x", "_ = (x)\nif _ is not None:\n    print(repr(_))\n"),
        ("a = 1; a  # note", "a = 1; _ = (a)\nif _ is not None:\n    print(repr(_))\n  # note"),
        ("'é' + 'x'", "_ = ('é' + 'x')\nif _ is not None:\n    print(repr(_))\n"),
        ("await f(\n  1)", "_ = (await f(\n  1))\nif _ is not None:\n    print(repr(_))\n"),
        ("for i in x:\n    i", "for i in x:\n    i"),
    ],
)
def test_only_a_final_top_level_expression_is_echoed_and_lines_keep_their_numbers(cell, expected):
    assert with_echo(cell) == expected
