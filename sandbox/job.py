"""One submitted run, from ``Sandbox.run`` until its single outcome.

Owns: the fields every stage of a run's life needs (queue, worker, result
conversion) and the rule that a run ends exactly once: the first outcome
set on ``future`` wins and every later one is ignored.

Must never: hold anything from a worker except what the worker process
handle already validated.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.worker import Completed

# Called with (0 for stdout or 1 for stderr, text, seconds since the run
# began) for each piece of output the run writes, as the host reads it
# (see ``sandbox.stream``).
OutputObserver = Callable[[int, str, float], None]

_sequence = itertools.count()


class Job:
    """A plain slotted class rather than a dataclass: one is made per run."""

    __slots__ = (
        "allow_await",
        "code",
        "filename",
        "files",
        "future",
        "inputs",
        "observer",
        "on_start",
        "seq",
        "started_at",
        "tenant",
        "wall_time_s",
    )

    def __init__(
        self,
        tenant: str,
        code: str,
        inputs: dict[str, bytes],
        allow_await: bool,
        filename: str,
        wall_time_s: float,
        future: asyncio.Future[Completed],
        observer: OutputObserver | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.tenant = tenant
        self.code = code
        self.inputs = inputs
        self.allow_await = allow_await
        self.filename = filename
        self.wall_time_s = wall_time_s
        self.future = future
        self.observer = observer
        self.files = files or {}  # relative path -> bytes, already checked by sandbox.files
        self.seq = next(_sequence)  # FIFO order across tenants, for fair-share ties
        self.started_at: float | None = None
        self.on_start: Callable[[], object] | None = None  # called once, when a worker takes the run

    def resolve(self, value: Completed) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
