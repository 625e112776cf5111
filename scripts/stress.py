#!/usr/bin/env python3
"""Load-test a Sandbox with a mix of ordinary and hostile code nodes.

What it does: opens one Sandbox with one or more ordinary tenants and a
``hostile`` tenant with short limits, keeps ``--concurrency`` runs in flight
until ``--runs`` runs were submitted (or ``--duration`` seconds passed), and
checks that every run ends in an outcome its workload expects. Ordinary
workloads are trivial runs, async sleeps, CPU-bound and memory-heavy runs;
a ``--hostile-fraction`` of runs are infinite loops, memory bombs, crashes,
output floods and fork attempts. It runs on uvloop (``uvloop.run``), as the
supervisor does in production, and a monitor task measures the event loop's
lag meanwhile. At the end it prints throughput, latency percentiles per
workload (queue wait and execution apart, see ``LATENCY_COLUMNS``), outcome
counts (expected or not), the loop lag, the supervisor's RSS and open fds,
and the processes left behind once the Sandbox closed; it writes the same as
JSON (``stress-report.json``) and plots latency over time, per-workload
histograms and the supervisor's RSS and fds (``stress-plot.png``) into
``--out DIR``: by default ``$XDG_CACHE_HOME/sandbox-stress`` (``~/.cache``
without it), outside the source tree.

How to run, from the repository root. Hostile code belongs in a throwaway
PID namespace, as for the hostile tests (add ``--map-current-user`` to
``unshare`` when not root)::

    ns="unshare --pid --fork --kill-child --mount-proc"
    $ns python scripts/stress.py --runs 2000 --concurrency 16 --hostile-fraction 0.1
    $ns python scripts/stress.py --duration 60 --tenants 2 --mix trivial=4,sleep=2,cpu=2,memory=1
    $ns python scripts/stress.py --soak --runs 100000 --no-plot   # RSS / fd / process growth

``--soak`` keeps constant-size statistics (log histograms instead of every
sample), runs ``--warmup`` runs first and fails when the supervisor's RSS
grew more than ``--max-rss-growth-pct`` between the drained warm pool and
the drained end. Optional extras: ``pip install '.[stress]'`` for the tqdm
progress bar (a plain progress line is printed without it, or when stdout
is not a terminal) and ``'.[plot]'`` for the PNG (matplotlib).

Exit status 0 when every run had an expected outcome; 1 when a run was lost
(submitted, never ended) or had an unexpected outcome, the loop lag passed
``--lag-threshold-ms``, an exception escaped into an event-loop callback,
``Sandbox.close()`` hung, or something leaked: a process left alive, more
fds than before the Sandbox opened, RSS growth past ``--max-rss-growth-pct``,
a worker scratch directory left on the host.
Worker scratch directories of this process's Sandbox (named with its owner
tag, see ``sandbox.leftovers``) that outlive it fail the run too; other
Sandboxes on the host do not count.

Must never: retry, drop or reclassify a run (each submitted run is counted
once, as its outcome or as lost); clean up after the sandbox (processes it
leaves are reported, never killed here); block the event loop with its own
bookkeeping (``/proc`` walks run in a thread), so the lag it reports is the
supervisor's; or print a figure it did not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib.metadata
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sandbox import Policy, Sandbox, SandboxError, leftovers

if TYPE_CHECKING:  # matplotlib is optional: the plot extra
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MiB = 1024 * 1024
HOSTILE_TENANT = "hostile"

# Climbs out of the Python-level import guard the way real attackers do.
_CLIMB_OUT = """\
def _mod(name):
    for c in ().__class__.__base__.__subclasses__():
        if c.__name__ == "_wrap_close":
            g = c.__init__.__globals__
            return g["sys"].modules.get(name) or g["__builtins__"]["__import__"](name)
"""


@dataclass(frozen=True)
class Workload:
    """One kind of run. Every run gets an int input ``token``; a run that
    returns normally must bind ``echo = token`` or it counts as wrong_output."""

    name: str
    code: str
    expected: frozenset[str]
    hostile: bool


def _workload(name: str, body: str, expected: Sequence[str], hostile: bool = False) -> Workload:
    return Workload(name, body + "\necho = token\n", frozenset(expected), hostile)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _workload("trivial", "pass", ["ok"]),
        _workload("sleep", "await asyncio.sleep(0.01)", ["ok"]),
        _workload("cpu", "total = sum(i * i for i in range(200_000))", ["ok"]),
        _workload("memory", "block = bytearray(64 * 1024 * 1024)\nsize = len(block)\ndel block", ["ok"]),
        _workload("infinite_loop", "while True:\n    pass", ["TimeLimitExceeded"], hostile=True),
        _workload(
            "memory_bomb",
            "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))",
            ["MemoryLimitExceeded"],
            hostile=True,
        ),
        _workload(
            "crash",
            _CLIMB_OUT + '_mod("ctypes").string_at(0)',
            ["WorkerCrashed", "PolicyViolation", "CodeError"],
            hostile=True,
        ),
        _workload(
            "output_flood",
            'while True:\n    print("x" * 65536)',
            ["OutputLimitExceeded", "TimeLimitExceeded"],
            hostile=True,
        ),
        _workload(
            "fork",
            _CLIMB_OUT + 'os = _mod("os")\nif os.fork() == 0:\n    os._exit(0)',
            ["CodeError", "PolicyViolation", "WorkerCrashed"],
            hostile=True,
        ),
    )
}
DEFAULT_MIX = "trivial=4,sleep=2,cpu=2,memory=1"
DEFAULT_HOSTILE_MIX = "infinite_loop=1,memory_bomb=1,crash=1,output_flood=1,fork=1"


# --- options ------------------------------------------------------------------------------


def parse_mix(text: str, hostile: bool) -> dict[str, float]:
    """``name=weight,...`` -> weights, checking that each name is a workload of that kind."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        workload = WORKLOADS.get(name)
        if workload is None or workload.hostile != hostile:
            kind = "hostile" if hostile else "ordinary"
            names = ", ".join(w.name for w in WORKLOADS.values() if w.hostile == hostile)
            raise argparse.ArgumentTypeError(f"{name!r} is not a {kind} workload (choose from {names})")
        try:
            weights[name] = float(weight or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {weight!r}") from None
        if weights[name] < 0:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is negative")
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("a mix needs at least one workload with a positive weight")
    return weights


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--runs", type=int, help="runs to submit (default 2000, or 100000 with --soak)")
    amount.add_argument("--duration", type=float, help="submit runs for this many seconds instead")
    parser.add_argument("--concurrency", type=int, default=16, help="runs in flight at once (default 16)")
    parser.add_argument(
        "--workers",
        type=int,
        default=psutil.cpu_count() or 2,
        help="worker processes of the Sandbox (default: number of CPUs)",
    )
    parser.add_argument(
        "--tenants",
        type=int,
        default=1,
        help="ordinary tenants: 'default', 'tenant-1', ... (default 1), each run going to one at random; "
        "every tenant keeps warm workers up to the Sandbox's warm budget, beyond it runs pay worker starts",
    )
    parser.add_argument(
        "--mix",
        type=lambda s: parse_mix(s, False),
        default=parse_mix(DEFAULT_MIX, False),
        help=f"weights of the ordinary workloads (default {DEFAULT_MIX})",
    )
    parser.add_argument(
        "--hostile-fraction", type=float, default=0.1, help="fraction of runs that are hostile (default 0.1)"
    )
    parser.add_argument(
        "--hostile-mix",
        type=lambda s: parse_mix(s, True),
        default=parse_mix(DEFAULT_HOSTILE_MIX, True),
        help=f"weights of the hostile workloads (default {DEFAULT_HOSTILE_MIX})",
    )
    parser.add_argument("--hostile-wall-s", type=float, default=0.5, help="hostile tenant's wall_time_s")
    parser.add_argument("--hostile-cpu-s", type=float, default=0.3, help="hostile tenant's cpu_time_s")
    parser.add_argument("--hostile-memory-mb", type=int, default=128, help="hostile tenant's memory_mb")
    parser.add_argument(
        "--lag-threshold-ms",
        type=float,
        default=100.0,
        help="fail when the loop lag's maximum passes this (default 100)",
    )
    parser.add_argument(
        "--lag-interval-ms", type=float, default=10.0, help="period of the lag monitor's sleeps (default 10)"
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=60.0,
        help="runs still pending after this long without any run ending are lost (default 60)",
    )
    parser.add_argument(
        "--leak-grace-s",
        type=float,
        default=2.0,
        help="time the Sandbox's processes get to exit after close (default 2)",
    )
    parser.add_argument(
        "--sample-every-s",
        type=float,
        help="period of the supervisor RSS/fd/process samples (default 1, 5 with --soak)",
    )
    parser.add_argument(
        "--soak", action="store_true", help="long-run mode: constant-memory statistics, warm-up, RSS growth check"
    )
    parser.add_argument("--warmup", type=int, help="runs before the baseline is taken (default 0, 1000 with --soak)")
    parser.add_argument(
        "--max-rss-growth-pct",
        type=float,
        help="fail when RSS grew more than this from baseline to end (default: off, 5 with --soak)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload choice (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out(),
        help=f"directory for stress-report.json and stress-plot.png (default {default_out()})",
    )
    parser.add_argument("--json", type=Path, help="JSON report path instead (default OUT/stress-report.json)")
    parser.add_argument("--plot", type=Path, help="PNG plot path instead (default OUT/stress-plot.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    remote = parser.add_argument_group("through HTTP (scripts/stress_http.py)")
    remote.add_argument("--server", metavar="URL", help="send the runs to a `sandbox serve` at URL")
    remote.add_argument("--server-keys", type=Path, metavar="FILE", help="JSON tenant -> API key, for --server")
    remote.add_argument("--server-pid", type=int, metavar="PID", help="measure RSS and fds of this server process")
    remote.add_argument("--server-setup", type=Path, metavar="DIR", help="write the server's files for this mix")
    options = parser.parse_args(argv)
    if options.server and not options.server_keys:
        parser.error("--server needs --server-keys (write them with --server-setup DIR)")
    if options.runs is None and options.duration is None:
        options.runs = 100_000 if options.soak else 2000
    if options.warmup is None:
        options.warmup = 1000 if options.soak else 0
    if options.sample_every_s is None:
        options.sample_every_s = 5.0 if options.soak else 1.0
    if options.max_rss_growth_pct is None and options.soak:
        options.max_rss_growth_pct = 5.0
    options.json = options.json or options.out / "stress-report.json"
    options.plot = options.plot or options.out / "stress-plot.png"
    for name in ("concurrency", "workers", "tenants"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= options.hostile_fraction <= 1:
        parser.error("--hostile-fraction must be between 0 and 1")
    return options


def default_out() -> Path:
    """Where reports go unless ``--out`` says otherwise: the user's cache, not the source tree."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sandbox-stress"


# --- statistics ------------------------------------------------------------------------------


class Distribution(Protocol):
    method: str

    @property
    def count(self) -> int: ...

    def add(self, value: float) -> None: ...

    def summary(self) -> dict[str, float]: ...

    def histogram(self) -> LogHistogram: ...


QUANTILES = (50, 90, 99)


class Samples:
    """Keeps every value; percentiles are exact (nearest rank)."""

    method = "exact, nearest rank"

    def __init__(self) -> None:
        self.values: list[float] = []

    @property
    def count(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        self.values.append(value)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.values)
        if not ordered:
            return {"count": 0}
        figures = {f"p{q}": ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] for q in QUANTILES}
        return {"count": len(ordered), **figures, "max": ordered[-1]}

    def histogram(self) -> LogHistogram:
        histogram = LogHistogram()
        for value in self.values:
            histogram.add(value)
        return histogram


class LogHistogram:
    """Constant memory: counts in bins 1/100 of a decade wide from 1 µs to 10^4 s.

    A percentile is the upper edge of the bin holding it, so it lies at most
    2.3 % above the true value; the maximum is exact.
    """

    method = "log histogram, 100 bins per decade (percentiles up to 2.3 % high)"
    _LOW_S = 1e-6
    _PER_DECADE = 100
    _BINS = 10 * _PER_DECADE

    def __init__(self) -> None:
        self.bins = [0] * self._BINS
        self.count = 0
        self.max = 0.0

    def add(self, value: float) -> None:
        index = 0 if value <= self._LOW_S else int(math.log10(value / self._LOW_S) * self._PER_DECADE)
        self.bins[min(index, self._BINS - 1)] += 1
        self.count += 1
        self.max = max(self.max, value)

    def _upper_edge(self, index: int) -> float:
        return self._LOW_S * 10 ** ((index + 1) / self._PER_DECADE)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        figures: dict[str, float] = {"count": self.count}
        cumulative = itertools.accumulate(self.bins)
        wanted = iter(QUANTILES)
        q: int | None = next(wanted)
        for index, seen in enumerate(cumulative):
            while q is not None and seen >= math.ceil(q / 100 * self.count):
                figures[f"p{q}"] = min(self._upper_edge(index), self.max)
                q = next(wanted, None)
        figures["max"] = self.max
        return figures

    def histogram(self) -> LogHistogram:
        return self

    def coarse(self, merge: int = 5) -> tuple[list[float], list[int]]:
        """Bins merged ``merge`` at a time, trimmed to the occupied range: (edges in s, counts)."""
        counts = [sum(self.bins[i : i + merge]) for i in range(0, self._BINS, merge)]
        occupied = [i for i, c in enumerate(counts) if c]
        if not occupied:
            return [], []
        first, last = occupied[0], occupied[-1]
        edges = [self._LOW_S * 10 ** (i * merge / self._PER_DECADE) for i in range(first, last + 2)]
        return edges, counts[first : last + 1]


def new_distribution(bounded: bool) -> Distribution:
    return LogHistogram() if bounded else Samples()


# --- recording runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    index: int
    workload: Workload
    tenant: str


# What each latency column measures, as the report prints it.
LATENCY_COLUMNS = {
    "queue wait": "total minus execution: waiting for a free or newly started worker, plus admission "
    "and decoding the result",
    "execution": "the run on its worker, from the request sent to the reply received (Result.stats.wall_s, "
    "read off the event loop's clock: whole milliseconds under uvloop)",
    "total": "Sandbox.run() called until it returned or raised: what the caller waits",
    "split": "runs whose total is split in two: those that returned a Result (an error carries no stats)",
}


@dataclass
class Recorder:
    """Every run's outcome, counted once; latency per workload: in total and, for
    runs that returned a Result, split into queue wait and execution."""

    bounded: bool
    submitted: int = 0
    completed: int = 0
    unexpected: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency: dict[str, Distribution] = field(default_factory=dict)
    queue_wait: dict[str, Distribution] = field(default_factory=dict)
    execution: dict[str, Distribution] = field(default_factory=dict)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    examples: list[dict[str, object]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    MAX_EXAMPLES = 10

    def record(
        self, planned: Planned, submitted_at: float, outcome: str, message: str, execution_s: float | None
    ) -> None:
        now = time.perf_counter()
        workload = planned.workload
        self.completed += 1
        self.outcomes[workload.name, outcome] += 1
        self._add(self.latency, workload.name, now - submitted_at)
        if execution_s is not None:
            self._add(self.execution, workload.name, execution_s)
            self._add(self.queue_wait, workload.name, max(0.0, now - submitted_at - execution_s))
        if not self.bounded:
            self.timeline.append((submitted_at - self.started, now - submitted_at, workload.name))
        if outcome not in workload.expected:
            self.unexpected += 1
            if len(self.examples) < self.MAX_EXAMPLES:
                self.examples.append(
                    {
                        "run": planned.index,
                        "workload": workload.name,
                        "tenant": planned.tenant,
                        "outcome": outcome,
                        "message": message[:500],
                    }
                )

    def _add(self, table: dict[str, Distribution], name: str, value: float) -> None:
        distribution = table.get(name)
        if distribution is None:
            distribution = table[name] = new_distribution(self.bounded)
        distribution.add(value)


async def one_run(sandbox: Sandbox, planned: Planned, recorder: Recorder, progress: Progress) -> None:
    """Submit one run and record how it ended; a cancelled run is left for the caller to count as lost."""
    submitted_at = time.perf_counter()
    message = ""
    execution_s = None
    try:
        result = await sandbox.run(planned.workload.code, {"token": planned.index}, tenant=planned.tenant)
        execution_s = result.stats.wall_s
        outcome = "ok" if result.outputs.get("echo") == planned.index else "wrong_output"
        if outcome == "wrong_output":
            message = f"outputs: {result.outputs!r}"
    except SandboxError as exc:
        outcome, message = type(exc).__name__, str(exc)
    except Exception as exc:
        outcome, message = f"internal:{type(exc).__name__}", repr(exc)
    recorder.record(planned, submitted_at, outcome, message, execution_s)
    progress.advance(recorder)


# --- progress ---------------------------------------------------------------------------------


class Progress(Protocol):
    def advance(self, recorder: Recorder) -> None: ...

    def close(self, recorder: Recorder) -> None: ...


class BarProgress:
    """tqdm progress bar on a terminal."""

    def __init__(self, tqdm_class: type, phase: str, total: int | None) -> None:
        self._bar = tqdm_class(total=total, desc=phase, unit="run", file=sys.stdout, dynamic_ncols=True)
        self._unexpected = 0

    def advance(self, recorder: Recorder) -> None:
        if recorder.unexpected != self._unexpected:
            self._unexpected = recorder.unexpected
            self._bar.set_postfix_str(f"unexpected {self._unexpected}", refresh=False)
        self._bar.update(1)

    def close(self, recorder: Recorder) -> None:
        self._bar.close()


class LineProgress:
    """A plain progress line every ``period_s``, for logs and pipes."""

    def __init__(self, phase: str, total: int | None, duration_s: float | None, period_s: float = 5.0) -> None:
        self._phase = phase
        self._goal = f"/{total} runs" if total is not None else f" runs of {duration_s:g} s"
        self._period_s = period_s
        self._next = time.perf_counter() + period_s

    def advance(self, recorder: Recorder) -> None:
        if time.perf_counter() >= self._next:
            self._print(recorder)
            self._next += self._period_s

    def close(self, recorder: Recorder) -> None:
        self._print(recorder)

    def _print(self, recorder: Recorder) -> None:
        elapsed = time.perf_counter() - recorder.started
        print(
            f"[{self._phase}] {recorder.completed}{self._goal}  {elapsed:.1f} s  "
            f"{recorder.completed / elapsed:.1f} runs/s  unexpected {recorder.unexpected}",
            flush=True,
        )


def new_progress(phase: str, total: int | None, duration_s: float | None) -> Progress:
    try:
        from tqdm import tqdm
    except ImportError:
        return LineProgress(phase, total, duration_s)
    if not sys.stdout.isatty():
        return LineProgress(phase, total, duration_s)
    return BarProgress(tqdm, phase, total)


# --- the event loop and the process ---------------------------------------------------------------


async def monitor_lag(interval_s: float, lag: Distribution) -> None:
    """Sleep ``interval_s`` over and over; record how late each wake-up is."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval_s)
        lag.add(max(0.0, time.perf_counter() - start - interval_s))


@dataclass
class LoopErrors:
    """Exceptions that escaped into event-loop callbacks (the loop only logs them)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            self.count += 1
            if len(self.examples) < 5:
                self.examples.append(f"{context.get('message')}: {context.get('exception')!r}"[:500])
            loop.default_exception_handler(context)

        loop.set_exception_handler(handler)


@dataclass(frozen=True)
class Resources:
    """The supervisor process and its descendants at one moment."""

    rss_bytes: int
    fds: int
    processes: int  # live descendants
    zombies: int  # descendants that exited but were never reaped
    host_dirs: int  # worker scratch directories of this process's Sandbox in the host's temp directory


def host_dirs_pattern() -> str:
    """This process's worker scratch directories: their names carry its owner tag."""
    return os.path.join(leftovers.HOST_TMP, f"sandbox-w*-{leftovers.owner_tag()}-*")


def host_dir_names() -> frozenset[str]:
    return frozenset(glob.glob(host_dirs_pattern()))


MEASURED_PID: int | None = None  # --server-pid: the server's figures instead of this process's


def measure_resources() -> Resources:
    """Blocking /proc reads; call it through ``asyncio.to_thread``."""
    me = psutil.Process(MEASURED_PID)
    alive = zombies = 0
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies += 1
            else:
                alive += 1
        except psutil.NoSuchProcess:
            pass
    return Resources(me.memory_info().rss, me.num_fds(), alive, zombies, len(host_dir_names()))


async def sample_resources(period_s: float, recorder: Recorder, samples: list[dict[str, float]]) -> None:
    while True:
        await asyncio.sleep(period_s)
        now = await asyncio.to_thread(measure_resources)
        samples.append({"t_s": time.perf_counter() - recorder.started, "runs": recorder.completed, **asdict(now)})


async def after_close(grace_s: float) -> tuple[Resources, Resources]:
    """Resources right after close, and once the descendants are gone (or ``grace_s`` passed)."""
    first = now = await asyncio.to_thread(measure_resources)
    deadline = time.perf_counter() + grace_s
    while now.processes + now.zombies and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
        now = await asyncio.to_thread(measure_resources)
    return first, now


# --- driving runs -------------------------------------------------------------------------------


def plan_runs(
    options: argparse.Namespace, count: int | None, duration_s: float | None, rng: random.Random
) -> Iterator[Planned]:
    """Runs to submit, chosen at random by the mixes, until ``count`` or ``duration_s`` is reached."""
    ordinary_tenants = ["default", *(f"tenant-{i}" for i in range(1, options.tenants))]
    ordinary, hostile = list(options.mix), list(options.hostile_mix)
    ordinary_weights, hostile_weights = list(options.mix.values()), list(options.hostile_mix.values())
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    for index in itertools.count():
        if (count is not None and index >= count) or (deadline is not None and time.perf_counter() >= deadline):
            return
        if rng.random() < options.hostile_fraction:
            name, tenant = rng.choices(hostile, hostile_weights)[0], HOSTILE_TENANT
        else:
            name, tenant = rng.choices(ordinary, ordinary_weights)[0], rng.choice(ordinary_tenants)
        yield Planned(index, WORKLOADS[name], tenant)


async def settle(pending: dict[asyncio.Task[None], Planned], keep_at_most: int, stall_s: float) -> bool:
    """Wait until at most ``keep_at_most`` runs are pending; False if none ended for ``stall_s``."""
    while len(pending) > keep_at_most:
        done, _ = await asyncio.wait(pending, timeout=stall_s, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return False
        for task in done:
            del pending[task]
    return True


@dataclass
class Phase:
    name: str
    recorder: Recorder
    lost: list[dict[str, object]]


async def run_phase(
    sandbox: Sandbox,
    name: str,
    count: int | None,
    duration_s: float | None,
    options: argparse.Namespace,
    rng: random.Random,
    recorder: Recorder,
) -> Phase:
    """Keep ``--concurrency`` runs in flight until ``count`` runs or ``duration_s`` seconds; count the lost."""
    progress = new_progress(name, count, duration_s)
    pending: dict[asyncio.Task[None], Planned] = {}
    flowing = True
    recorder.started = time.perf_counter()
    for planned in plan_runs(options, count, duration_s, rng):
        flowing = await settle(pending, options.concurrency - 1, options.stall_timeout_s)
        if not flowing:
            break
        recorder.submitted += 1
        pending[asyncio.create_task(one_run(sandbox, planned, recorder, progress))] = planned
    if flowing:
        await settle(pending, 0, options.stall_timeout_s)
    recorder.finished = time.perf_counter()
    progress.close(recorder)
    lost = [{"run": p.index, "workload": p.workload.name, "tenant": p.tenant} for p in pending.values()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=options.stall_timeout_s)
    return Phase(name, recorder, lost)


def policies(options: argparse.Namespace) -> dict[str, Policy]:
    tenants = {"default": Policy(), **{f"tenant-{i}": Policy() for i in range(1, options.tenants)}}
    if options.hostile_fraction > 0:
        tenants[HOSTILE_TENANT] = Policy(
            wall_time_s=options.hostile_wall_s, cpu_time_s=options.hostile_cpu_s, memory_mb=options.hostile_memory_mb
        )
    return tenants


async def close_within(sandbox: Sandbox, timeout_s: float) -> dict[str, object]:
    """Close the Sandbox; how long it took, and whether it finished within ``timeout_s``."""
    start = time.perf_counter()
    try:
        await asyncio.wait_for(sandbox.close(), timeout_s)
    except TimeoutError:
        return {"seconds": round(time.perf_counter() - start, 3), "finished": False}
    return {"seconds": round(time.perf_counter() - start, 3), "finished": True}


async def stress(options: argparse.Namespace) -> dict[str, object]:
    """Run the whole load test; return the judged report."""
    rng = random.Random(options.seed)
    # The process's owner lock (sandbox.leftovers) is held until it exits, not
    # closed with the Sandbox: taken first, it is not counted as a leaked fd.
    leftovers.owner_tag()
    loop_errors = LoopErrors()
    loop_errors.install(asyncio.get_running_loop())
    resources: dict[str, Resources] = {"before_sandbox": await asyncio.to_thread(measure_resources)}
    lag = new_distribution(options.soak)
    timeline: list[dict[str, float]] = []
    if options.server:
        from stress_http import RemoteSandbox, load_keys

        sandbox = RemoteSandbox(options.server, load_keys(options.server_keys), options.concurrency)
    else:
        sandbox = Sandbox(tenants=policies(options), workers=options.workers)
    await sandbox.start()
    try:
        resources["started"] = await asyncio.to_thread(measure_resources)
        warmup = None
        if options.warmup:
            warmup = await run_phase(
                sandbox, "warm-up", options.warmup, None, options, rng, Recorder(bounded=options.soak)
            )
        resources["baseline"] = await asyncio.to_thread(measure_resources)
        recorder = Recorder(bounded=options.soak)
        watchers = [
            asyncio.create_task(monitor_lag(options.lag_interval_ms / 1000, lag)),
            asyncio.create_task(sample_resources(options.sample_every_s, recorder, timeline)),
        ]
        main = await run_phase(sandbox, "runs", options.runs, options.duration, options, rng, recorder)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        resources["drained"] = await asyncio.to_thread(measure_resources)
        # Warm workers outlive their runs, one or more per tenant: each has a scratch directory.
        workers_drained = None if options.server else sum(sandbox.stats().workers.values())
        layers = dict(sandbox.host.layers) if sandbox.host else {}
    finally:
        close = await close_within(sandbox, options.stall_timeout_s)
    resources["closed"], resources["after_grace"] = await after_close(options.leak_grace_s)
    close["host_dirs_left"] = sorted(await asyncio.to_thread(host_dir_names))
    close["workers_when_drained"] = workers_drained
    return build_report(options, main, warmup, lag, loop_errors, resources, timeline, layers, close)


# --- the report -----------------------------------------------------------------------------------


def _ms(figures: dict[str, float]) -> dict[str, float]:
    return {k: (v if k == "count" else round(v * 1000, 3)) for k, v in figures.items()}


def histogram_bins(distribution: Distribution) -> dict[str, list[Any]]:
    edges, counts = distribution.histogram().coarse()
    return {"edges_ms": [round(edge * 1000, 4) for edge in edges], "counts": counts}


def outcome_rows(recorder: Recorder) -> list[dict[str, object]]:
    return [
        {"workload": workload, "outcome": outcome, "count": count, "expected": outcome in WORKLOADS[workload].expected}
        for (workload, outcome), count in sorted(recorder.outcomes.items())
    ]


def build_report(
    options: argparse.Namespace,
    main: Phase,
    warmup: Phase | None,
    lag: Distribution,
    loop_errors: LoopErrors,
    resources: dict[str, Resources],
    timeline: list[dict[str, float]],
    layers: dict[str, str],
    close: dict[str, object],
) -> dict[str, object]:
    recorder = main.recorder
    elapsed = (recorder.finished or time.perf_counter()) - recorder.started
    report: dict[str, object] = {
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(options).items()},
        "host": {
            "python": sys.version.split()[0],
            "cpus": psutil.cpu_count(),
            "uvloop": importlib.metadata.version("uvloop"),
            "layers": layers,
        },
        "statistics": LogHistogram.method if options.soak else Samples.method,
        "submitted": recorder.submitted,
        "completed": recorder.completed,
        "elapsed_s": round(elapsed, 3),
        "throughput_runs_per_s": round(recorder.completed / elapsed, 2) if elapsed > 0 else None,
        "latency_columns": LATENCY_COLUMNS,
        "latency_ms": {
            name: {
                "total": _ms(total.summary()),
                "queue_wait": _ms(recorder.queue_wait[name].summary()) if name in recorder.queue_wait else {"count": 0},
                "execution": _ms(recorder.execution[name].summary()) if name in recorder.execution else {"count": 0},
            }
            for name, total in sorted(recorder.latency.items())
        },
        "latency_histograms": {name: histogram_bins(dist) for name, dist in sorted(recorder.latency.items())},
        "outcomes": outcome_rows(recorder),
        "unexpected": recorder.unexpected,
        "unexpected_examples": recorder.examples,
        "lost_runs": main.lost,
        "loop_lag_ms": {
            **_ms(lag.summary()),
            "interval_ms": options.lag_interval_ms,
            "threshold_ms": options.lag_threshold_ms,
        },
        "loop_callback_errors": asdict(loop_errors),
        "close": close,
        "resources": {name: asdict(value) for name, value in resources.items()},
        "resource_timeline": timeline,
        "latency_timeline": recorder.timeline,
    }
    if warmup is not None:
        report["warmup"] = {
            "submitted": warmup.recorder.submitted,
            "completed": warmup.recorder.completed,
            "outcomes": outcome_rows(warmup.recorder),
            "unexpected": warmup.recorder.unexpected,
            "unexpected_examples": warmup.recorder.examples,
            "lost_runs": warmup.lost,
        }
    report["failures"] = judge(report, options)
    report["passed"] = not report["failures"]
    return report


def judge(report: dict[str, Any], options: argparse.Namespace) -> list[dict[str, str]]:
    """Every reason the stress run failed, as {check, message}."""
    failures: list[dict[str, str]] = []

    def fail(check: str, message: str) -> None:
        failures.append({"check": check, "message": message})

    phases = [("", report)] + ([("warm-up: ", report["warmup"])] if "warmup" in report else [])
    for prefix, section in phases:
        if section["lost_runs"] or section["completed"] != section["submitted"]:
            fail(
                "lost",
                f"{prefix}{section['submitted'] - section['completed']} of {section['submitted']} "
                f"submitted runs never ended",
            )
        if section["unexpected"]:
            fail(
                "unexpected", f"{prefix}{section['unexpected']} runs ended in an outcome their workload does not expect"
            )
    lag_max = report["loop_lag_ms"].get("max")
    if lag_max is not None and lag_max > options.lag_threshold_ms:
        fail("loop_lag", f"event-loop lag reached {lag_max:.1f} ms (threshold {options.lag_threshold_ms:g} ms)")
    errors = report["loop_callback_errors"]
    if errors["count"]:
        fail(
            "loop_errors",
            f"{errors['count']} exceptions escaped into event-loop callbacks, first: {errors['examples'][0]}",
        )
    if not report["close"]["finished"]:
        fail("close", f"Sandbox.close() had not returned after {report['close']['seconds']:g} s")
    res = report["resources"]
    # Through HTTP the server outlives the run: its fds are compared from the
    # warm baseline to the drained end, and its workers are still its own.
    left = res["drained"] if options.server else res["after_grace"]
    fds_before = res["baseline" if options.server else "before_sandbox"]["fds"]
    if not options.server and (left["processes"] or left["zombies"]):
        fail(
            "processes",
            f"{left['processes']} live and {left['zombies']} zombie descendants remain "
            f"{options.leak_grace_s:g} s after the Sandbox closed",
        )
    if report["close"]["host_dirs_left"]:
        fail(
            "host_dirs",
            f"{len(report['close']['host_dirs_left'])} worker scratch directories ({host_dirs_pattern()}) "
            f"appeared during the run and remain after close: "
            f"{', '.join(report['close']['host_dirs_left'][:5])}",
        )
    if left["fds"] > fds_before:
        fail("fds", f"{left['fds']} fds open after close, {fds_before} before the Sandbox")
    if options.max_rss_growth_pct is not None:
        growth = rss_growth_pct(res)
        if growth > options.max_rss_growth_pct:
            fail(
                "rss",
                f"supervisor RSS grew {growth:.1f} % from baseline to end (limit {options.max_rss_growth_pct:g} %)",
            )
    return failures


def rss_growth_pct(resources: dict[str, dict[str, int]]) -> float:
    baseline, end = resources["baseline"]["rss_bytes"], resources["drained"]["rss_bytes"]
    return (end - baseline) / baseline * 100


def print_report(report: dict[str, Any]) -> None:
    config = report["config"]
    amount = f"{config['runs']} runs" if config["runs"] is not None else f"{config['duration']:g} s"
    print(
        f"\nstress: {amount}, concurrency {config['concurrency']}, {config['workers']} workers, "
        f"{config['tenants']} ordinary tenants + hostile ({config['hostile_fraction']:.0%} of runs)"
    )
    print(
        f"completed {report['completed']} of {report['submitted']} runs in {report['elapsed_s']:.1f} s: "
        f"{report['throughput_runs_per_s']} runs/s"
    )
    print_latency(report)
    print("\noutcomes")
    for row in report["outcomes"]:
        mark = "expected" if row["expected"] else "UNEXPECTED"
        print(f"  {row['workload']:<14}{row['outcome']:<24}{row['count']:>8}  {mark}")
    for example in report["unexpected_examples"]:
        print(
            f"  e.g. run {example['run']} ({example['workload']}): {example['outcome']}: {example['message'][:200]!r}"
        )
    print(f"  lost (submitted, never ended): {len(report['lost_runs'])}")
    lag = report["loop_lag_ms"]
    if lag["count"]:
        print(
            f"\nevent-loop lag (ms, {lag['count']} wake-ups every {lag['interval_ms']:g} ms): "
            f"p50 {lag['p50']:.2f}  p99 {lag['p99']:.2f}  max {lag['max']:.2f}  "
            f"(threshold {lag['threshold_ms']:g})"
        )
    errors = report["loop_callback_errors"]
    print(f"exceptions escaped into event-loop callbacks: {errors['count']}")
    print_close(report["close"])
    print_resources(report["resources"], config)
    if "warmup" in report:
        warmup = report["warmup"]
        print(
            f"\nwarm-up: {warmup['completed']} of {warmup['submitted']} runs ended, "
            f"{warmup['unexpected']} unexpected, {len(warmup['lost_runs'])} lost"
        )
    print()
    for failure in report["failures"]:
        print(f"FAIL {failure['check']}: {failure['message']}")
    print("PASS" if report["passed"] else "FAILED")


_SPLIT_FIGURES = ("p50", "p99", "max")
_TOTAL_FIGURES = ("p50", "p90", "p99", "max")


def print_latency(report: dict[str, Any]) -> None:
    print(f"\nlatency per workload (ms; {report['statistics']})")
    width = 8
    print(f"  {'':<14}{'':>6}{'':>6}  {'queue wait':^{3 * width}}  {'execution':^{3 * width}}  {'total':^{4 * width}}")
    figures_header = "".join(f"{k:>{width}}" for k in _SPLIT_FIGURES)
    print(
        f"  {'workload':<14}{'runs':>6}{'split':>6}  {figures_header}  {figures_header}  "
        + "".join(f"{k:>{width}}" for k in _TOTAL_FIGURES)
    )

    def cells(figures: dict[str, float], keys: tuple[str, ...]) -> str:
        return "".join(f"{figures[k]:>{width}.1f}" if figures["count"] else f"{'-':>{width}}" for k in keys)

    for name, columns in report["latency_ms"].items():
        print(
            f"  {name:<14}{columns['total']['count']:>6}{columns['execution']['count']:>6}  "
            f"{cells(columns['queue_wait'], _SPLIT_FIGURES)}  {cells(columns['execution'], _SPLIT_FIGURES)}  "
            f"{cells(columns['total'], _TOTAL_FIGURES)}"
        )
    for column, meaning in report["latency_columns"].items():
        print(f"  {column + ':':<12}{meaning}")


def print_resources(resources: dict[str, dict[str, int]], config: dict[str, Any]) -> None:
    print("\nsupervisor process")
    print(f"  {'moment':<34}{'RSS MiB':>9}{'fds':>6}{'procs':>7}{'zombies':>9}{'host dirs':>11}")
    labels = {
        "before_sandbox": "before the Sandbox opened",
        "started": "Sandbox started",
        "baseline": "baseline (after warm-up)",
        "drained": "all runs ended",
        "closed": "Sandbox closed",
        "after_grace": f"closed + up to {config['leak_grace_s']:g} s grace",
    }
    for key, label in labels.items():
        if key == "baseline" and not config["warmup"]:
            continue
        r = resources[key]
        print(
            f"  {label:<34}{r['rss_bytes'] / MiB:>9.1f}{r['fds']:>6}{r['processes']:>7}{r['zombies']:>9}"
            f"{r['host_dirs']:>11}"
        )
    if config["warmup"]:
        print(f"  RSS growth baseline -> all runs ended: {rss_growth_pct(resources):+.2f} %")
    left = resources["after_grace"]
    print(f"  processes left behind: {left['processes'] + left['zombies']}")


def print_close(close: dict[str, Any]) -> None:
    state = "returned" if close["finished"] else "had NOT returned"
    print(
        f"Sandbox.close() {state} after {close['seconds']:.2f} s; worker scratch directories "
        f"left on the host: {len(close['host_dirs_left'])}"
    )


# --- the plot -------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> str:
    """Draw latency over time, per-workload histograms and the supervisor's RSS; return what was done."""
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install '.[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = draw(report)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"


def draw(report: dict[str, Any]) -> Figure:
    """The figure the PNG shows."""
    import matplotlib.pyplot as plt

    timeline = report["latency_timeline"]
    panels = 3 if timeline else 2
    # Constrained layout makes room for the legends, which sit outside the axes so as to cover no data.
    figure, grid = plt.subplots(panels, 1, figsize=(12, 4 * panels), squeeze=False, layout="constrained")
    axes = [row[0] for row in grid]
    if timeline:
        draw_latency_over_time(axes[0], timeline)
    draw_histograms(axes[-2], report["latency_histograms"])
    draw_resources(axes[-1], report["resource_timeline"])
    return figure


_LEGEND_OUTSIDE: dict[str, Any] = {
    "loc": "upper left",
    "bbox_to_anchor": (1.08, 1),
    "borderaxespad": 0,
    "fontsize": "small",
}


def draw_latency_over_time(axis: Axes, timeline: list[tuple[float, float, str]]) -> None:
    by_workload: dict[str, tuple[list[float], list[float]]] = {}
    for t, latency, name in timeline:
        xs, ys = by_workload.setdefault(name, ([], []))
        xs.append(t)
        ys.append(latency * 1000)
    for name, (xs, ys) in sorted(by_workload.items()):
        axis.scatter(xs, ys, s=4, alpha=0.5, label=name)
    axis.set(yscale="log", xlabel="submitted at (s)", ylabel="total latency (ms)", title="latency over time")
    axis.legend(markerscale=3, **_LEGEND_OUTSIDE)


def draw_histograms(axis: Axes, histograms: dict[str, dict[str, list[Any]]]) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, bins in histograms.items():
        if bins["counts"]:
            axis.stairs(bins["counts"], bins["edges_ms"], label=name)
    axis.set(xscale="log", xlabel="total latency (ms)", ylabel="runs", title="latency per workload")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))  # run counts
    axis.legend(**_LEGEND_OUTSIDE)


def draw_resources(axis: Axes, timeline: list[dict[str, float]]) -> None:
    """Both axes start at 0, so that a swing of a few MiB looks as small as it is next to the whole RSS."""
    from matplotlib.ticker import MaxNLocator

    axis.set(xlabel="runs ended", ylabel="RSS (MiB)", title="supervisor RSS and open fds")
    if not timeline:
        return
    runs = [s["runs"] for s in timeline]
    rss = [s["rss_bytes"] / MiB for s in timeline]
    (rss_line,) = axis.plot(runs, rss, "o-", markersize=3, color="tab:blue", label="RSS (MiB, left)")
    axis.set_ylim(0, max(rss) * 1.2)
    fds = axis.twinx()
    fd_counts = [s["fds"] for s in timeline]
    (fd_line,) = fds.plot(runs, fd_counts, "o-", markersize=3, color="tab:orange", label="open fds (right)")
    fds.set_ylim(0, max(fd_counts) * 1.2 + 1)
    fds.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count: no fractional ticks
    fds.set_ylabel("open fds")
    axis.legend(handles=[rss_line, fd_line], **_LEGEND_OUTSIDE)


# --- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    global MEASURED_PID
    options = parse_args(argv)
    if options.server_setup:
        from stress_http import write_setup

        write_setup(options.server_setup, policies(options))
        return 0
    MEASURED_PID = options.server_pid
    report = uvloop.run(stress(options))
    print_report(report)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=1))
    print(f"report written to {options.json}")
    if not options.no_plot:
        options.plot.parent.mkdir(parents=True, exist_ok=True)
        print(plot(report, options.plot))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
