#!/usr/bin/env python3
"""Measure how the sandbox's costs grow with its work: the "scale on paper" series.

What it does: four series, each at least three points, each point measured
in this one invocation on a fresh Sandbox:

* tenants (default 10, 100, 1000, 10000): ``Sandbox.start()`` time and the
  supervisor's RSS growth with that many tenants configured, and trivial
  runs/s with the tenants taken round-robin, 16 runs in flight, 2 workers;
* tenants waiting at once (default 16, 100, 250, 1000): as many tenants as
  runs in flight, so every tenant has a run queued at any moment (at least
  twice as many timed runs as tenants);
* runs in flight (default 1, 4, 16, 64; one tenant): runs/s and the p50
  latency of one run;
* output size (default 1 KB to 4 MB): p50 of a run that returns a bytes
  value of that size;
* input size (same sizes): p50 of a run given a bytes input of that size.

How to run (from the repository root; see docs/BENCHMARKS.md)::

    python scripts/scale.py --json scale.json
    python scripts/scale.py --tenants 10,100,1000 --rounds 50     # quicker

Must never: compare figures from different invocations, or print a figure it
did not measure. Targets are not its business (``scripts/bench.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from bench import TRIVIAL_CODE, percentile

from sandbox import Policy, Sandbox

KB = 1024


def sizes(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


async def tenants_point(count: int, runs: int, in_flight: int, workers: int) -> dict[str, float]:
    """Also the supervisor's CPU per timed run (this process's, so the
    benchmark's own tasks and semaphore count too) and the p99 of its loop's
    lag meanwhile (how late a 1 ms sleep wakes)."""
    rss_before = psutil.Process().memory_info().rss
    policies = {f"t{i}": Policy() for i in range(count)}
    start = time.perf_counter()
    sandbox = Sandbox(tenants=policies, workers=workers)
    await sandbox.start()
    started = time.perf_counter() - start
    try:
        names = itertools.cycle(policies)
        gate = asyncio.Semaphore(in_flight)

        async def one(name: str) -> None:
            async with gate:
                await sandbox.run(TRIVIAL_CODE, tenant=name)

        await asyncio.gather(*(one(next(names)) for _ in range(min(runs, count))))
        lags: list[float] = []
        probe = asyncio.create_task(measure_lag(lags))
        cpu_before = time.process_time()
        begin = time.perf_counter()
        await asyncio.gather(*(one(next(names)) for _ in range(runs)))
        rate = runs / (time.perf_counter() - begin)
        cpu_us = (time.process_time() - cpu_before) / runs * 1e6
        probe.cancel()
        warm = len(sandbox._pool.workers) if sandbox._pool is not None else 0
        rss = psutil.Process().memory_info().rss - rss_before
    finally:
        await sandbox.close()
    return {
        "start_s": started,
        "runs_per_s": rate,
        "supervisor_cpu_us_per_run": cpu_us,
        "loop_lag_p99_ms": percentile(lags, 99) * 1000,
        "warm_workers": warm,
        "supervisor_rss_growth_mb": rss / 2**20,
    }


async def measure_lag(lags: list[float], interval_s: float = 0.001) -> None:
    while True:
        began = time.perf_counter()
        await asyncio.sleep(interval_s)
        lags.append(max(0.0, time.perf_counter() - began - interval_s))


async def in_flight_point(in_flight: int, runs: int, workers: int) -> dict[str, float]:
    async with Sandbox(Policy(), workers=workers) as sandbox:
        gate = asyncio.Semaphore(in_flight)
        latencies: list[float] = []

        async def one() -> None:
            async with gate:
                began = time.perf_counter()
                await sandbox.run(TRIVIAL_CODE)
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(one() for _ in range(workers * 10)))
        latencies.clear()
        begin = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(runs)))
        rate = runs / (time.perf_counter() - begin)
    return {"runs_per_s": rate, "latency_p50_ms": percentile(latencies, 50) * 1000}


async def size_point(size: int, rounds: int, *, output: bool) -> dict[str, float]:
    policy = Policy(max_result_bytes=max(8 * 2**20, 2 * size), max_reply_bytes=max(16 * 2**20, 4 * size))
    code, inputs = (f"result = b'x' * {size}", None) if output else ("n = len(data)", {"data": b"x" * size})
    async with Sandbox(policy, workers=1) as sandbox:
        for _ in range(3):
            await sandbox.run(code, inputs)
        trips = []
        for _ in range(rounds):
            began = time.perf_counter()
            await sandbox.run(code, inputs)
            trips.append(time.perf_counter() - began)
    return {"p50_ms": percentile(trips, 50) * 1000, "mb_per_s": size / 2**20 / percentile(trips, 50)}


async def measure(options: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    report: dict[str, dict[str, dict[str, float]]] = {
        "tenants": {},
        "tenants_waiting": {},
        "in_flight": {},
        "output": {},
        "input": {},
    }
    for count in options.tenants:
        print(f"measuring {count} tenants", file=sys.stderr, flush=True)
        report["tenants"][str(count)] = await tenants_point(count, options.tenant_runs, 16, options.workers)
    for count in options.waiting:
        print(f"measuring {count} tenants waiting at once", file=sys.stderr, flush=True)
        runs = max(options.tenant_runs, 2 * count)
        report["tenants_waiting"][str(count)] = await tenants_point(count, runs, count, options.workers)
    for in_flight in options.in_flight:
        print(f"measuring {in_flight} in flight", file=sys.stderr, flush=True)
        report["in_flight"][str(in_flight)] = await in_flight_point(in_flight, options.runs, options.workers)
    for size in options.sizes:
        print(f"measuring {size} bytes out and in", file=sys.stderr, flush=True)
        report["output"][str(size)] = await size_point(size, options.rounds, output=True)
        report["input"][str(size)] = await size_point(size, options.rounds, output=False)
    return report


def print_report(report: dict[str, dict[str, dict[str, float]]]) -> None:
    for series, points in report.items():
        print(f"\n{series}")
        for point, figures in points.items():
            cells = "  ".join(f"{key} {value:.4g}" for key, value in figures.items())
            print(f"  {point:>9}: {cells}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="workers (runs in flight at once) (default 2)")
    parser.add_argument("--tenants", type=sizes, default=[10, 100, 1000, 10000], help="tenant counts")
    parser.add_argument("--tenant-runs", type=int, default=400, help="timed runs per tenant count (default 400)")
    parser.add_argument(
        "--waiting", type=sizes, default=[16, 100, 250, 1000], help="tenant counts, each with a run queued at once"
    )
    parser.add_argument("--in-flight", type=sizes, default=[1, 4, 16, 64], help="runs in flight")
    parser.add_argument("--runs", type=int, default=2000, help="timed runs per in-flight point (default 2000)")
    parser.add_argument(
        "--sizes", type=sizes, default=[KB, 64 * KB, 1024 * KB, 4096 * KB], help="output and input sizes in bytes"
    )
    parser.add_argument("--rounds", type=int, default=100, help="round trips per size (default 100)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    report = uvloop.run(measure(options))
    print_report(report)
    if options.json is not None:
        options.json.write_text(json.dumps({"options": {k: str(v) for k, v in vars(options).items()}, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
