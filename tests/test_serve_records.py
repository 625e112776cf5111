"""The bounds on polled runs' records (``sandbox.service.records``), which need no server to check."""

from __future__ import annotations

import time

import pytest

from sandbox.service.records import RecordsFull, RunRecords


def test_records_belong_to_their_tenant() -> None:
    records = RunRecords(max_records=10, keep_s=60)
    mine = records.add("a")
    assert records.get("a", mine.id) is mine
    assert records.get("b", mine.id) is None
    assert records.get("a", "unknown") is None


def test_a_full_store_drops_the_oldest_finished_record_and_never_a_pending_one() -> None:
    records = RunRecords(max_records=2, keep_s=60)
    first, second = records.add("a"), records.add("a")
    with pytest.raises(RecordsFull):
        records.add("a")
    records.finish(second, {"ok": True})
    third = records.add("a")
    assert records.get("a", second.id) is None
    assert records.get("a", first.id) is first and records.get("a", third.id) is third
    assert len(records) == 2


def test_a_finished_record_expires_after_keep_s() -> None:
    records = RunRecords(max_records=10, keep_s=0.05)
    done, pending = records.add("a"), records.add("a")
    records.finish(done, {"ok": True})
    assert records.get("a", done.id).view() == {"id": done.id, "state": "done", "ok": True}
    time.sleep(0.1)
    assert records.get("a", done.id) is None
    assert records.get("a", pending.id) is pending and pending.view() == {"id": pending.id, "state": "queued"}
