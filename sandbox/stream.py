"""A run's output, delivered to an ``async for`` as the run writes it.

Owns: ``Output`` and ``RunStream``, the async iterator ``Sandbox.stream``
and ``Session.stream`` return, and the rule that leaving its loop early
cancels the run.

Must never: run anything itself, or hold output of its own. A stream runs
the very coroutine ``run()`` is (``Sandbox.execute`` or a session's run),
in a task, with an observer that the worker process handle calls with each
decoded piece of output as it reads it from the pipes. And ``Result.stdout``
and ``stderr`` are exactly the concatenation of what the loop yielded.

What a consumer that is behind, or never reads, costs: nothing the run
waits for (pieces are kept, never pushed back into the pipes, so the run
goes on and ends under its limits as any run does), and no output of the
stream's own. While the run goes on, the pieces kept for the consumer are
the very string objects the worker process handle keeps for the run's
``Result``, which ``max_output_bytes`` bounds (past it the run fails).
Once the run has ended, the backlog drops its pieces and becomes offsets
into the ``Result``'s (or the error's) ``stdout`` and ``stderr``. Either
way the supervisor holds what ``run()`` would, plus a few dozen bytes per
piece not yet taken.

Why leaving the loop cancels the run, and how: ``async for`` neither closes
nor tells its iterator when the loop body breaks or raises. So
``RunStream.__aiter__`` hands the loop an iterator object of its own that
nothing else refers to: when the loop is left, CPython drops that object at
once, and its finalizer cancels the run's task, which kills the worker and
frees the slot exactly as when a task awaiting ``run()`` is cancelled.
Cancelling the consuming task, or calling ``aclose()``, does the same.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from sandbox.errors import SandboxError
from sandbox.job import OutputObserver
from sandbox.result import Result

_STREAM_NAMES: tuple[Literal["stdout"], Literal["stderr"]] = ("stdout", "stderr")
# Runs the run with the observer that receives its output; returns its Result.
Launcher = Callable[[OutputObserver], Coroutine[Any, Any, Result]]


@dataclass(frozen=True, slots=True)
class Output:
    """One piece of a run's output: ``stream`` is "stdout" or "stderr",
    ``text`` what was written, ``at`` when (seconds since the run began)."""

    stream: Literal["stdout", "stderr"]
    text: str
    at: float


class _Entry:
    """Consecutive output of one stream not yet taken: its pieces, or where it lies in the final output."""

    __slots__ = ("at", "index", "length", "pieces", "start")

    def __init__(self, index: int, at: float, start: int, text: str) -> None:
        self.index = index
        self.at = at
        self.start = start
        self.length = len(text)
        self.pieces: list[str] | None = [text]


class _Backlog:
    """Output not yet taken by the consumer, and the run's end.

    Consecutive pieces of the same stream are kept together and handed out
    as one ``Output`` (with the time of its first piece), so a consumer
    that falls behind gets fewer, larger pieces rather than a queue that
    grows with every write.
    """

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[Result] | None = None
        self.result: Result | None = None
        self._written = [0, 0]  # characters seen so far on stdout and stderr
        self._final: tuple[str, str] | None = None  # the run's whole output, once it has ended

    def add(self, index: int, text: str, at: float) -> None:
        last = self.entries[-1] if self.entries else None
        if last is not None and last.index == index and last.pieces is not None:
            last.pieces.append(text)
            last.length += len(text)
        else:
            self.entries.append(_Entry(index, at, self._written[index], text))
        self._written[index] += len(text)
        self.wake()

    def take(self) -> Output:
        entry = self.entries.popleft()
        if entry.pieces is not None:
            text = "".join(entry.pieces)
        else:
            assert self._final is not None
            text = self._final[entry.index][entry.start : entry.start + entry.length]
        return Output(_STREAM_NAMES[entry.index], text, entry.at)

    def settled(self, task: asyncio.Task[Result]) -> None:
        if not task.cancelled():
            error = task.exception()  # the loop raises it; a loop that was left early never asks
            ended = task.result() if error is None else error
            if isinstance(ended, (Result, SandboxError)) and [len(ended.stdout), len(ended.stderr)] == self._written:
                self._final = (ended.stdout, ended.stderr)
                for entry in self.entries:
                    entry.pieces = None
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def cancel(self) -> None:
        task = self.task
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:
                pass  # its event loop is already closed; nothing is running any more


class RunStream:
    """``async for out in stream`` yields ``Output`` as the run writes it.

    The run is submitted when the loop starts. When the loop has ended,
    ``result`` holds the run's ``Result``; if the run failed, the loop
    first yields every piece of output the run wrote, then raises the
    ``SandboxError`` that ``run()`` would have raised, with the same
    ``stdout`` and ``stderr``. Leaving the loop early (``break``, an
    exception, cancelling the task, ``aclose()``) cancels the run.
    A stream can be iterated once.
    """

    def __init__(self, launch: Launcher) -> None:
        self._launch: Launcher | None = launch
        self._backlog = _Backlog()

    @property
    def result(self) -> Result | None:
        """The run's Result once the loop has ended normally; None before, or if it failed."""
        return self._backlog.result

    def __aiter__(self) -> _Iteration:
        launch, self._launch = self._launch, None
        if launch is None:
            raise SandboxError("a stream can be iterated only once; call stream() again for another run")
        return _Iteration(launch, self._backlog)

    async def aclose(self) -> None:
        """Cancel the run if it is still going (its worker is killed)."""
        self._launch = None
        self._backlog.cancel()


class _Iteration:
    """The iterator ``async for`` holds; only the loop refers to it (see the module docstring)."""

    def __init__(self, launch: Launcher, backlog: _Backlog) -> None:
        self._launch: Launcher | None = launch
        self._backlog = backlog

    def __aiter__(self) -> _Iteration:
        return self

    async def __anext__(self) -> Output:
        backlog = self._backlog
        if self._launch is not None:
            launch, self._launch = self._launch, None
            backlog.task = asyncio.get_running_loop().create_task(launch(backlog.add))
            backlog.task.add_done_callback(backlog.settled)
        task = backlog.task
        if task is None or task.cancelled():
            raise StopAsyncIteration
        while not backlog.entries:
            if task.done():
                backlog.task = None
                backlog.result = task.result()  # raises the run's error, after every piece was yielded
                raise StopAsyncIteration
            backlog.waiter = asyncio.get_running_loop().create_future()
            try:
                await backlog.waiter
            except asyncio.CancelledError:
                backlog.cancel()
                raise
            finally:
                backlog.waiter = None
        return backlog.take()

    async def aclose(self) -> None:
        self._launch = None
        self._backlog.cancel()

    def __del__(self) -> None:
        self._backlog.cancel()
