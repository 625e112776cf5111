"""The shared samples' ``then:`` clauses, mapped to checks, and one sample run end to end.

Every clause of a sample's ``then:`` is matched against the patterns in
:data:`CLAUSES`; a clause that no check understands fails the test rather
than passing unchecked. On top of the clauses, every run must leave the host
intact (:func:`tests.hostile.checks.assert_host_intact`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sandbox.policies import Policy
from tests.hostile.checks import (
    LAG_LIMIT_S,
    RSS_GROWTH_LIMIT,
    TIME_MARGIN_S,
    Listeners,
    assert_host_intact,
    host_only_dir,
    open_listeners,
    report_text,
    supervisor_uid,
)
from tests.hostile.client import HarnessProcess
from tests.hostile.samples import Sample

KNOWN_OUTCOMES = frozenset(
    {
        "ok",
        "CodeError",
        "TimeLimitExceeded",
        "MemoryLimitExceeded",
        "OutputLimitExceeded",
        "PolicyViolation",
        "WorkerCrashed",
    }
)
_PROBE_LIMIT_S = 1.0


@dataclass
class RunContext:
    """What a clause check may look at: the run's report and the test-side probes."""

    report: dict
    harness: HarnessProcess
    policy: Policy
    canary: Path
    listeners: Listeners


@dataclass(frozen=True)
class Clause:
    """A ``then:`` clause pattern, the request options it needs and its check."""

    pattern: str
    check: Callable[[RunContext], None]
    options: dict = field(default_factory=dict)


def _ends_near_wall_limit(ctx: RunContext) -> None:
    limit = ctx.policy.wall_time_s + TIME_MARGIN_S
    assert ctx.report["elapsed_s"] <= limit, f"ran {ctx.report['elapsed_s']:.2f} s, limit + margin {limit} s"


def _concurrent_run_on_time(ctx: RunContext) -> None:
    probe = ctx.report["probe"]
    assert probe["ok"], f"a run submitted meanwhile failed: {probe['detail']}"
    assert probe["elapsed_s"] < _PROBE_LIMIT_S, f"a run submitted meanwhile took {probe['elapsed_s']:.2f} s"


def _no_file_over_size_limit(ctx: RunContext) -> None:
    limit = ctx.policy.max_file_size_mb * 1024 * 1024
    largest = ctx.report["scratch_largest"]
    assert isinstance(largest, int), f"the scratch inspection failed: {largest}"
    assert largest <= limit, f"a {largest}-byte file remains where runs can write (limit {limit})"


def _genuine_marker_only(ctx: RunContext) -> None:
    if ctx.report["outcome"] == "ok":
        outputs = ctx.report["outputs"]
        assert outputs["marker"]["value"] == "genuine", outputs
        assert "status" not in outputs, f"a forged reply reached the caller: {outputs}"


def _worker_replaced(ctx: RunContext) -> None:
    gone = set(ctx.report["workers_before"]) - set(ctx.report["workers_after"])
    assert gone, f"no worker was replaced: before {ctx.report['workers_before']}, after {ctx.report['workers_after']}"


def _listener_untouched(ctx: RunContext) -> None:
    ctx.listeners.poll()
    assert not ctx.listeners.accepted, f"the listener accepted {ctx.listeners.accepted}"


def _memory_bounded(ctx: RunContext) -> None:
    growth = ctx.report["rss_growth_bytes"]
    assert growth < RSS_GROWTH_LIMIT, f"the supervisor's RSS grew by {growth} bytes"


def _output_capped(ctx: RunContext) -> None:
    captured = len(ctx.report["stdout"].encode()) + len(ctx.report["stderr"].encode())
    assert captured <= ctx.policy.max_output_bytes, f"{captured} bytes captured"


def _other_tenant_unpoisoned(ctx: RunContext) -> None:
    assert ctx.report["tenant_check"] == {"outcome": "ok", "dumped": '{"a": 1}'}, ctx.report["tenant_check"]


def _canary_absent(ctx: RunContext) -> None:
    assert not ctx.canary.exists(), f"the canary {ctx.canary} was created"


def _opaque_if_ok(ctx: RunContext) -> None:
    if ctx.report["outcome"] == "ok":
        assert ctx.report["outputs"]["value"]["opaque"], ctx.report["outputs"]["value"]


def _secret_absent(ctx: RunContext) -> None:
    assert ctx.harness.secret not in report_text(ctx.report)
    assert not ctx.report["secret_found_in"], ctx.report["secret_found_in"]


def _no_shadow_line(ctx: RunContext) -> None:
    lines = [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()]
    text = report_text(ctx.report)
    assert lines and not [line for line in lines if line in text], "a line of /etc/shadow reached the caller"


def _no_leftovers(ctx: RunContext) -> None:
    assert not ctx.report["leftovers"], ctx.report["leftovers"]


def _host_can_fork(ctx: RunContext) -> None:
    assert ctx.report["host_can_fork"]


def _next_run_ok(ctx: RunContext) -> None:
    assert ctx.report["next_run"]["ok"], ctx.report["next_run"]


def _supervisor_alive(ctx: RunContext) -> None:
    assert ctx.report["harness_alive_after"]


def _rlimits_unchanged(ctx: RunContext) -> None:
    assert not ctx.report["rlimits_changed"], ctx.report["rlimits_changed"]


def _loop_never_blocked(ctx: RunContext) -> None:
    assert ctx.report["max_lag_s"] < LAG_LIMIT_S, f"loop lag {ctx.report['max_lag_s'] * 1000:.0f} ms"


CLAUSES = [
    Clause(r"loop never blocked", _loop_never_blocked),
    Clause(r"other runs submitted meanwhile complete on time", _concurrent_run_on_time, {"probe_concurrently": True}),
    Clause(r"ends within the wall limit plus a small margin", _ends_near_wall_limit),
    Clause(r"^supervisor alive$", _supervisor_alive),
    Clause(r"^next run succeeds$", _next_run_ok),
    Clause(
        r"no file larger than the policy's file-size limit remains", _no_file_over_size_limit, {"inspect_scratch": True}
    ),
    Clause(r'outputs\["marker"\] == "genuine"', _genuine_marker_only),
    Clause(r"no process of the run is left behind", _no_leftovers),
    Clause(r"the host can still fork", _host_can_fork),
    Clause(r"worker is sigkilled and replaced|the pool replaces the worker", _worker_replaced),
    Clause(r"listener on 127\.0\.0\.1:port accepted no connection", _listener_untouched),
    Clause(r"supervisor memory (unaffected|stays bounded)", _memory_bounded),
    Clause(r"truncated to the policy's cap|whatever is captured respects the cap", _output_capped),
    Clause(r"a later run of a different tenant .*json\.dumps", _other_tenant_unpoisoned, {"check_tenant": "other"}),
    Clause(r"canary does not exist", _canary_absent),
    Clause(r"the value is held opaque", _opaque_if_ok),
    Clause(r"secret appears in no output", _secret_absent),
    Clause(r"no output contains a line of /etc/shadow", _no_shadow_line),
    Clause(r"supervisor rlimits unchanged", _rlimits_unchanged),
]


def clauses_for(sample: Sample) -> list[tuple[str, Clause]]:
    """Each ``then:`` clause with the checks that understand it; unknown clauses fail."""
    matched = []
    for text in sample.then:
        found = [clause for clause in CLAUSES if re.search(clause.pattern, text.lower())]
        if not found:
            pytest.fail(f"sample {sample.name}: no check understands the clause {text!r}")
        matched += [(text, clause) for clause in found]
    return matched


def check_sample(harness: HarnessProcess, policy: Policy, sample: Sample) -> None:
    """Run ``sample`` with the inputs its header names; assert its contract and the host's."""
    matched = clauses_for(sample)
    options: dict = {}
    for _, clause in matched:
        options.update(clause.options)
    with host_only_dir(supervisor_uid(harness)) as directory, open_listeners() as listeners:
        canary = directory / "canary"
        inputs = {"canary": str(canary), "port": listeners.tcp_port}
        report = harness.run(sample.code, {name: inputs[name] for name in sample.inputs if name in inputs}, **options)
        assert report["outcome"] in sample.expect, (
            f"{sample.name} ({sample.attack}) ended in {report['outcome']}: {report['message'][:500]}; "
            f"the header accepts {sorted(sample.expect)}"
        )
        ctx = RunContext(report, harness, policy, canary, listeners)
        for text, clause in matched:
            try:
                clause.check(ctx)
            except AssertionError as exc:
                raise AssertionError(f"{sample.name}: 'then: {text}' does not hold: {exc}") from None
        assert_host_intact(report, harness, listeners=listeners, forbidden_paths=[canary])
