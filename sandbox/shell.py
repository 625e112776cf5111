"""``sandbox shell``: an interactive prompt over a session.

Owns: the read-eval-print loop for people: reading lines until a statement
is complete (the rules of the stdlib ``code`` module, with top-level
``await`` allowed), echoing the value of a final expression, writing the
run's output as it streams in, and telling the user when the session was
lost and a new one started.

Must never: evaluate anything on the host. A cell is compiled here only to
decide whether it is complete; it runs in the session's worker, and the
value echo is a rewrite of its text, not an evaluation.

Why two threads: ``input()`` keeps line editing and history (readline) but
blocks, so the prompt stays on the main thread, where Ctrl-C arrives as
``KeyboardInterrupt``, and the Sandbox runs on an event loop in a thread of
its own. Output is written from that thread as each piece arrives.
"""

from __future__ import annotations

import ast
import asyncio
import codeop
import sys
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TextIO, TypeVar

import uvloop

from sandbox.errors import CodeError, SandboxError
from sandbox.policies.model import Policy
from sandbox.session import Session
from sandbox.supervisor import Sandbox

_T = TypeVar("_T")
PROMPT, CONTINUATION = ">>> ", "... "
_ECHO_NAME = "_"  # like the stdlib prompt; private, so never an output


class Shell:
    def __init__(self, tenants: Mapping[str, Policy], tenant: str, out: TextIO = sys.stdout) -> None:
        self.tenant = tenant
        self._tenants = dict(tenants)
        self._out = out
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-shell-loop", daemon=True)
        self._sandbox: Sandbox | None = None
        self._session: Session | None = None
        self._compile = codeop.CommandCompiler()
        self._compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

    # --- the prompt (main thread) -----------------------------------------------------

    def interact(self) -> int:
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        self._thread.start()
        try:
            self._call(self._open())
        except SandboxError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop()
            return 1
        self._write(f"sandbox shell: tenant {self.tenant!r}, top-level await allowed; Ctrl-D leaves\n")
        try:
            self._loop_over_cells()
        finally:
            self._stop()
        return 0

    def _loop_over_cells(self) -> None:
        lines: list[str] = []
        while True:
            try:
                line = input(CONTINUATION if lines else PROMPT)
            except EOFError:
                self._write("\n")
                return
            except KeyboardInterrupt:
                self._write("\nKeyboardInterrupt\n")
                lines = []
                continue
            lines.append(line)
            source = "\n".join(lines)
            try:
                complete = self._compile(source, "<shell>", "single") is not None
            except (SyntaxError, ValueError, OverflowError) as exc:
                self._write(f"{type(exc).__name__}: {exc}\n")
                lines = []
                continue
            if complete:
                lines = []
                self._run_cell(source)

    def _run_cell(self, source: str) -> None:
        future = asyncio.run_coroutine_threadsafe(self._stream(with_echo(source)), self._loop)
        try:
            future.result()
        except KeyboardInterrupt:
            future.cancel()  # cancels the run: its worker is killed, and the session with it
            self._write("KeyboardInterrupt\n")
            self._call(self._renew("the run was interrupted, which killed the session's worker"))

    # --- the session (loop thread) ----------------------------------------------------------

    async def _open(self) -> None:
        self._sandbox = Sandbox(tenants=self._tenants, workers=1)
        await self._sandbox.start()
        await self._new_session()

    async def _new_session(self) -> None:
        assert self._sandbox is not None
        self._session = self._sandbox.session(self.tenant)
        await self._session.open()

    async def _stream(self, code: str) -> None:
        if self._session is None:  # the last attempt to start one failed
            await self._renew()
        session = self._session
        if session is None:
            return
        try:
            async for out in session.stream(code, filename="<shell>"):
                self._write(out.text, err=out.stream == "stderr")
        except CodeError as exc:
            self._write(exc.traceback or f"{exc.type_name}: {exc.message}\n", err=True)
        except SandboxError as exc:
            self._write(f"{type(exc).__name__}: {exc}\n", err=True)
        await self._renew()

    async def _renew(self, reason: str | None = None) -> None:
        """Start a new session if this one is over (or ``reason`` says it must be), and say so."""
        session = self._session
        if session is not None:
            if session.ended is None and reason is None:
                return
            if session.ended is not None:
                reason = str(session.ended)
            await session.close()
            self._write(f"the session was lost: {reason}\nstarting a new session\n", err=True)
        try:
            await self._new_session()
        except SandboxError as exc:
            self._write(f"could not start a new session: {type(exc).__name__}: {exc}\n", err=True)
            self._session = None

    async def _close(self) -> None:
        if self._sandbox is not None:
            await self._sandbox.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _write(self, text: str, *, err: bool = False) -> None:
        stream = sys.stderr if err else self._out
        stream.write(text)
        stream.flush()


def with_echo(source: str) -> str:
    """``source`` whose final expression, if any, also prints its repr (unless None), as a prompt does.

    The expression is wrapped where it stands, so every line keeps its number.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source  # the worker reports it, with its line
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return source
    node = tree.body[-1].value
    if node.end_lineno is None or node.end_col_offset is None:
        return source
    lines = source.splitlines(keepends=True)
    start = _offset(lines, node.lineno, node.col_offset)
    end = _offset(lines, node.end_lineno, node.end_col_offset)
    echo = f"\nif {_ECHO_NAME} is not None:\n    print(repr({_ECHO_NAME}))\n"
    return f"{source[:start]}{_ECHO_NAME} = ({source[start:end]}){echo}{source[end:]}"


def _offset(lines: list[str], lineno: int, col_bytes: int) -> int:
    """The str index of an ast position (1-based line, UTF-8 byte column)."""
    line = lines[lineno - 1]
    return sum(len(text) for text in lines[: lineno - 1]) + len(line.encode()[:col_bytes].decode())
