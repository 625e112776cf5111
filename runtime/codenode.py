"""Code-node semantics inside a worker: bind inputs, compile, execute, snapshot.

Owns: what a run *means* to the user, following the PythonCodeNode /
AsyncPythonCodeNode model of workflow SDKs:

* inputs are bound as variables before the code runs;
* top-level ``await`` is compiled with ``PyCF_ALLOW_TOP_LEVEL_AWAIT``, never
  by indenting the code into a function (which would break multi-line
  strings and shift line numbers);
* one dict serves as globals and locals, so functions, classes and
  comprehensions all see top-level names;
* ``asyncio`` is pre-bound;
* every top-level name the code binds or rebinds is an output, except the
  kinds in :func:`_skip_reason`, each reported in ``skipped`` with why;
* in a session (``settings["session"]``) one namespace serves every run, so
  names bound by earlier runs stay visible, and a run's outputs are what
  that run bound or rebound.

Must never: talk to the channel, or trust anything about the values it
serializes. User objects can run code in ``__reduce__``, ``__str__`` or
``__format__``; this module calls those only inside this worker, where the
worst they can do is spoil their own run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import linecache
import pickle
import threading
import traceback
import types
from collections.abc import Coroutine

import cloudpickle

from sandbox.runtime import values, wire
from sandbox.runtime.guards import Guard, ImportBlocked, ImportPolicy, explain_refused_sockets, load_input

_TOP_LEVEL_AWAIT = 0x2000  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
# Names the interpreter itself puts into a module namespace; never the code's own variables.
_INTERPRETER_NAMES = frozenset({"__builtins__", "__name__", "__warningregistry__", "__annotations__"})
_COMPILE_CACHE_SIZE = 256
_LEFTOVER_TASK_GRACE_S = 0.2


_FUNCTIONS = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    functools.partial,
    staticmethod,
    classmethod,
)
_AWAITABLES = (types.CoroutineType, asyncio.Future, concurrent.futures.Future)
_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)
_SYNC_PRIMITIVES = (
    asyncio.Lock,
    asyncio.Semaphore,
    asyncio.Event,
    asyncio.Condition,
    asyncio.Barrier,
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Semaphore,
    threading.Event,
    threading.Condition,
)


def _skip_reason(name: str, value: object) -> str | None:
    if name.startswith("_"):
        return "private name (starts with an underscore)"
    if isinstance(value, types.ModuleType):
        return "module"
    if isinstance(value, type):
        return "class"
    if isinstance(value, _FUNCTIONS):
        return "function"
    if isinstance(value, _AWAITABLES):
        return "coroutine, task or future"
    if isinstance(value, _GENERATORS):
        return "generator"
    if isinstance(value, _SYNC_PRIMITIVES):
        return "lock, semaphore or other synchronization primitive"
    return None


def _type_label(value: object) -> str:
    cls = type(value)
    try:
        module = cls.__module__
        label = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
        return wire.clip_text(str(label), 512)
    except Exception:
        return "?"


class RunOutcome:
    """What one run produced, before the worker adds token and statistics."""

    __slots__ = ("error", "outputs", "retire", "skipped", "status")

    def __init__(self, status: int = wire.OK) -> None:
        self.status = status
        self.outputs: list[tuple[str, str, bytes]] = []
        self.skipped: dict[str, str] = {}
        self.error: tuple[str, str, str, str] | None = None
        self.retire = False


class CodeNode:
    def __init__(self, settings: dict) -> None:
        self.policy = ImportPolicy(settings["allowed_modules"], settings["denied_modules"], settings["tenant"])
        self.guard = Guard(self.policy, settings["removed_builtins"])
        if not settings["network"] and not settings.get("egress"):  # with egress, refusals name no policy fix
            explain_refused_sockets(settings["tenant"])
        self.max_value_bytes: int = settings["max_result_bytes"]
        self.max_total_bytes: int = settings["max_reply_bytes"]
        self.prebind_asyncio = not any(p in ("asyncio", "asyncio.*") for p in settings["denied_modules"])
        self._compiled: dict[tuple[str, bool, str], tuple[types.CodeType, tuple]] = {}
        self._session_namespace: dict | None = self._fresh_namespace() if settings["session"] else None

    def _fresh_namespace(self) -> dict:
        namespace: dict = {"__builtins__": self.guard.fresh_builtins(), "__name__": "__main__"}
        if self.prebind_asyncio:
            namespace["asyncio"] = asyncio
        return namespace

    def run(self, code: str, inputs: dict[str, bytes], allow_await: bool, filename: str) -> RunOutcome:
        namespace = self._session_namespace if self._session_namespace is not None else self._fresh_namespace()
        for name, blob in inputs.items():
            try:
                namespace[name] = load_input(blob, self.policy)
            except ImportBlocked as exc:
                return _failure(wire.POLICY_VIOLATION, exc, "", exc.module)
            except BaseException as exc:
                return _failure(wire.INPUT_ERROR, exc, "", name)
        preset = dict(namespace)
        try:
            compiled = self._compile(code, allow_await, filename)
        except SyntaxError as exc:  # also IndentationError, TabError
            if exc.text is None and exc.lineno and exc.filename == filename:
                # Errors found after parsing ('await' outside function) come
                # without their source line; the code is in linecache.
                exc.text = linecache.getline(filename, exc.lineno)
            return _failure(wire.CODE_ERROR, exc, _format_traceback(exc, filename), "")
        outcome = RunOutcome()
        try:
            if compiled.co_flags & inspect.CO_COROUTINE:
                outcome.retire = _run_coroutine(eval(compiled, namespace))
            else:
                exec(compiled, namespace)
        except BaseException as exc:
            return self._classify_failure(exc, filename, namespace, outcome.retire)
        try:
            self._snapshot(namespace, preset, outcome)
        except MemoryError as exc:
            namespace.clear()
            outcome = _failure(wire.MEMORY_LIMIT, exc, "", "")
        return outcome

    def _compile(self, code: str, allow_await: bool, filename: str) -> types.CodeType:
        key = (code, allow_await, filename)
        cached = self._compiled.get(key)
        if cached is None:
            # Tracebacks read source lines from linecache, keyed by the filename.
            lines = (len(code), None, code.splitlines(True), filename)
            linecache.cache[filename] = lines
            compiled = compile(code, filename, "exec", flags=_TOP_LEVEL_AWAIT if allow_await else 0, dont_inherit=True)
            if len(self._compiled) >= _COMPILE_CACHE_SIZE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = (compiled, lines)
            return compiled
        compiled, lines = cached
        linecache.cache[filename] = lines  # another run may have used the same filename for other code
        return compiled

    def _classify_failure(self, exc: BaseException, filename: str, namespace: dict, retire: bool) -> RunOutcome:
        if isinstance(exc, MemoryError):
            namespace.clear()  # give the reply room to be built
            status, detail = wire.MEMORY_LIMIT, ""
        elif isinstance(exc, ImportBlocked):
            status, detail = wire.POLICY_VIOLATION, exc.module
        else:
            status, detail = wire.CODE_ERROR, ""
        outcome = _failure(status, exc, _format_traceback(exc, filename), detail)
        outcome.retire = retire
        return outcome

    def _snapshot(self, namespace: dict, preset: dict, outcome: RunOutcome) -> None:
        total = 0
        for name, value in list(namespace.items()):
            if not isinstance(name, str) or not name.isidentifier() or len(name) > wire.MAX_LABEL_BYTES // 4:
                continue  # only reachable through globals() tricks, or absurdly long
            if name in _INTERPRETER_NAMES or (name in preset and preset[name] is value):
                continue  # interpreter machinery, pre-bound, or an input the code did not rebind
            reason = _skip_reason(name, value)
            if reason is None:
                try:
                    blob = _serialize(value)
                except MemoryError:
                    raise
                except BaseException as exc:
                    reason = f"cannot be serialized: {_describe(exc)}"
            if reason is not None:
                outcome.skipped[name] = wire.clip_text(reason, wire.MAX_LABEL_BYTES // 2)
                continue
            total += len(blob)
            over_value = len(blob) > self.max_value_bytes
            if over_value or total > self.max_total_bytes:
                if over_value:
                    message = (
                        f"variable {name!r} is {len(blob)} bytes serialized, over the policy's "
                        f"max_result_bytes of {self.max_value_bytes}"
                    )
                else:
                    message = (
                        f"variable {name!r} brings the outputs to {total} bytes serialized, over "
                        f"the policy's max_reply_bytes of {self.max_total_bytes}"
                    )
                outcome.status = wire.OUTPUT_LIMIT
                outcome.outputs.clear()
                outcome.skipped.clear()
                outcome.error = ("OutputLimitExceeded", message, "", name)
                return
            outcome.outputs.append((name, _type_label(value), blob))


_PLAIN_PICKLE = frozenset({int, float, str, bytes, bool, type(None)})


def _serialize(value: object) -> bytes:
    """cloudpickle; plain pickle for the scalars where both write the same bytes (4x faster);
    .npy or Arrow bytes for the numpy and pandas values that the host can rebuild without pickle."""
    if type(value) in _PLAIN_PICKLE:
        return pickle.dumps(value, protocol=5)
    return values.encode(value) or cloudpickle.dumps(value, protocol=5)


def _run_coroutine(coroutine: Coroutine[object, object, object]) -> bool:
    """Run top-level-await code on a fresh loop; True if it left work behind."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coroutine)
    finally:
        leftovers = _cancel_leftovers(loop)
    return leftovers


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=_LEFTOVER_TASK_GRACE_S))
        stubborn = any(not task.done() for task in pending)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.set_exception_handler(lambda *_: None)
        loop.close()
        return stubborn
    except BaseException:
        return True


def _failure(status: int, exc: BaseException, tb: str, detail: str) -> RunOutcome:
    outcome = RunOutcome(status)
    outcome.error = (type(exc).__name__, _describe(exc), tb, detail)
    return outcome


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:
        text = "<str() of the exception failed>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _format_traceback(exc: BaseException, filename: str) -> str:
    """The traceback restricted to the user's own frames, with their line numbers."""
    try:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
        lines += traceback.format_exception_only(type(exc), exc)
        return "".join(lines)
    except BaseException:
        return _describe(exc)
