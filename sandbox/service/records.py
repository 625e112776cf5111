"""Runs submitted with ``wait=false``, kept until their tenant polls them.

Owns: the record of each such run (its tenant, its state ``queued`` ->
``running`` -> ``done``, and its final body), the random ids that name them,
and the bounds on how many are kept and for how long.

Must never: show a record to another tenant (an id of another tenant is
answered exactly as an unknown one), or drop a record whose run has not
ended (the bound is enforced by refusing new runs instead).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sandbox.jsonform import JSON


@dataclass(eq=False)
class RunRecord:
    id: str
    tenant: str
    state: str = "queued"
    body: dict[str, JSON] | None = None
    finished_at: float | None = field(default=None, repr=False)

    def started(self) -> None:
        self.state = "running"

    def view(self) -> dict[str, JSON]:
        """What ``GET /v1/runs/{id}`` answers: the id and state, then, once done, the run's body."""
        return {"id": self.id, "state": self.state, **(self.body or {})}


class RecordsFull(Exception):
    """Every kept record belongs to a run that has not ended."""


class RunRecords:
    """At most ``max_records`` records; a finished one is kept ``keep_s`` seconds."""

    def __init__(self, max_records: int, keep_s: float) -> None:
        self.max_records = max_records
        self.keep_s = keep_s
        self._records: dict[str, RunRecord] = {}
        self._done: OrderedDict[str, RunRecord] = OrderedDict()  # in the order they finished

    def __len__(self) -> int:
        return len(self._records)

    def add(self, tenant: str) -> RunRecord:
        self._expire()
        if len(self._records) >= self.max_records:
            if not self._done:
                raise RecordsFull(f"{self.max_records} polled runs are still pending; poll them or retry later")
            oldest_done, _ = self._done.popitem(last=False)
            del self._records[oldest_done]
        record = RunRecord(secrets.token_urlsafe(16), tenant)
        self._records[record.id] = record
        return record

    def finish(self, record: RunRecord, body: dict[str, JSON]) -> None:
        record.state, record.body, record.finished_at = "done", body, time.monotonic()
        self._done[record.id] = record

    def get(self, tenant: str, run_id: str) -> RunRecord | None:
        self._expire()
        record = self._records.get(run_id)
        return record if record is not None and record.tenant == tenant else None

    def _expire(self) -> None:
        deadline = time.monotonic() - self.keep_s
        while self._done:
            oldest = next(iter(self._done.values()))
            if oldest.finished_at is None or oldest.finished_at >= deadline:
                break
            del self._done[oldest.id], self._records[oldest.id]
