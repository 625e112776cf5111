#!/usr/bin/env python3
"""Benchmark live runs: write-to-delivery latency of streams, and what a session run costs.

What it measures, in one process against real workers:

* write-to-delivery latency: a run prints ``--lines`` lines, each carrying
  ``time.monotonic()`` as the worker read it just before the write, with a
  pause between lines so that each travels on its own; the consumer of
  ``Sandbox.stream`` notes ``time.monotonic()`` when the line reaches its
  ``async for`` body. Both read CLOCK_MONOTONIC of the same kernel (workers
  get no time namespace), so the difference is the delivery latency:
  pipe, event loop, incremental decoding and the stream's hand-over.
  Reported as p50, p99 and max;
* a trivial run (``x = 1``) one at a time, ``--rounds`` times each, as a
  plain warm run (``Sandbox.run``), as a streamed run consumed to the end
  (``Sandbox.stream``), and as a run in an open session (``Session.run``),
  interleaved round by round so that drift on a loaded machine hits all
  three alike; p50 and p99 of each;
* opening a session (a new dedicated worker) and closing it: p50 over
  ``--sessions`` sessions.

How to run (from the repository root; see docs/BENCHMARKS.md)::

    python scripts/bench_live.py
    python scripts/bench_live.py --lines 200 --rounds 300 --json live.json

Must never: print a figure it did not measure, or enforce a target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import uvloop

from sandbox import Policy, Sandbox

_LINE_PAUSE_S = 0.005


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": max(values) * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
    }


async def delivery_latency(sb: Sandbox, lines: int) -> list[float]:
    code = f"import time\nfor i in range({lines}):\n    print(time.monotonic())\n    time.sleep({_LINE_PAUSE_S})"
    latencies = []
    async for out in sb.stream(code):
        received = time.monotonic()
        for line in out.text.splitlines():
            latencies.append(received - float(line))
    if len(latencies) != lines:
        raise SystemExit(f"expected {lines} lines, got {len(latencies)}")
    return latencies


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def run_costs(sb: Sandbox, rounds: int) -> dict[str, list[float]]:
    async def streamed() -> None:
        async for _ in sb.stream("x = 1"):
            pass

    costs: dict[str, list[float]] = {"plain run": [], "streamed run": [], "session run": []}
    async with sb.session() as session:
        for _ in range(20):  # warm every path first
            await sb.run("x = 1")
            await streamed()
            await session.run("x = 1")
        for _ in range(rounds):
            costs["plain run"].append(await timed(lambda: sb.run("x = 1")))
            costs["streamed run"].append(await timed(streamed))
            costs["session run"].append(await timed(lambda: session.run("x = 1")))
    return costs


async def session_open_close(sb: Sandbox, count: int) -> list[float]:
    async def open_and_close() -> None:
        async with sb.session() as session:
            await session.run("x = 1")

    return [await timed(open_and_close) for _ in range(count)]


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    async with Sandbox(Policy(wall_time_s=60, cpu_time_s=30), workers=2) as sb:
        report = {"write-to-delivery latency": summary_ms(await delivery_latency(sb, args.lines))}
        for name, values in (await run_costs(sb, args.rounds)).items():
            report[name] = summary_ms(values)
        report["session open + one run + close"] = summary_ms(await session_open_close(sb, args.sessions))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500, help="lines streamed for the latency figure")
    parser.add_argument("--rounds", type=int, default=1000, help="trivial runs of each kind")
    parser.add_argument("--sessions", type=int, default=50, help="sessions opened and closed")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    arguments = parser.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    results = uvloop.run(main(arguments))
    print(f"load average before the run: {load}")
    print(f"{'':34}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, figures in results.items():
        print(f"{label:34}{figures['p50_ms']:9.3f}{figures['p99_ms']:9.3f}{figures['max_ms']:9.3f}")
    if arguments.json:
        with open(arguments.json, "w") as f:
            json.dump({"load_average": float(load), **results}, f, indent=2)
