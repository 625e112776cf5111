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
from dataclasses import dataclass, field

_sequence = itertools.count()


@dataclass(eq=False)
class Job:
    tenant: str
    code: str
    inputs: dict[str, bytes]
    allow_await: bool
    filename: str
    wall_time_s: float
    future: asyncio.Future
    seq: int = field(default_factory=lambda: next(_sequence))
    started_at: float | None = None

    def resolve(self, value: object) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
