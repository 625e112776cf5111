#!/usr/bin/env python3
"""What confinement costs: per run, and per worker start, layer by layer.

What it does: runs the same trivial code node (``result = 1``) under
policies that differ only in ``skip_layers``, in this one process, and
prints for each:

* warm round trip p50 and p99 (one run at a time on a warm pool);
* CPU per run, supervisor and workers, while many runs flow on every core
  (from ``getrusage`` and the workers' ``/proc`` times);
* a new process per run, p50 (``fresh_process_per_run=True``): a worker
  start and its confinement, plus the run;
* ``Sandbox.start()`` with one worker, median of ``--repeats``: the zygote,
  the layer probe and the first confined worker.

Rows: ``core`` skips every layer (the bare pool and code-node path),
``all layers`` is the default policy, and each ``without X`` row skips one
layer (``mountns`` together with ``landlock``, whose rules assume the
confined file-system view). Every row's ratio is to ``core`` from the same
invocation. Layers this host cannot provide are skipped in every row.

How to run, from the repository root::

    python scripts/confinement_cost.py
    python scripts/confinement_cost.py --rounds 300 --runs 1000   # quicker

Must never: compare figures from different invocations, or print a figure
it did not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sandbox import Policy, Sandbox
from sandbox.policies.model import LAYERS

TRIVIAL_CODE = "result = 1"
WITHOUT = {
    "seccomp": ["seccomp"],
    "landlock": ["landlock"],
    "cgroup": ["cgroup"],
    "netns": ["netns"],
    "ipcns": ["ipcns"],
    "identity": ["identity"],
    "rlimits": ["rlimits"],
    "pidns": ["pidns"],
    "mountns": ["mountns", "landlock"],
}


def policies(unsupported: list[str]) -> dict[str, Policy]:
    rows = {"core": list(LAYERS), "all layers": []}
    rows.update({f"without {name}": skipped for name, skipped in WITHOUT.items() if name not in unsupported})
    return {
        label: Policy(skip_layers=sorted(set(skipped) | set(unsupported)), required_layers=[])
        for label, skipped in rows.items()
    }


async def host_unsupported() -> list[str]:
    async with Sandbox(Policy(), workers=1) as sb:
        return [layer for layer, state in sb.host.layers.items() if state != "on"]


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


async def warm_and_cpu(policy: Policy, rounds: int, runs: int, workers: int) -> dict[str, float]:
    async with Sandbox(policy, workers=workers) as sb:
        await asyncio.gather(*(sb.run(TRIVIAL_CODE) for _ in range(workers * 20)))
        trips = []
        for _ in range(rounds):
            start = time.perf_counter()
            await sb.run(TRIVIAL_CODE)
            trips.append(time.perf_counter() - start)
        children = psutil.Process().children(recursive=True)
        before_children, before_self = cpu_seconds(children), resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(sb.run(TRIVIAL_CODE) for _ in range(runs)))
        after_children, after_self = cpu_seconds(children), resource.getrusage(resource.RUSAGE_SELF)
    trips.sort()
    host = (after_self.ru_utime + after_self.ru_stime) - (before_self.ru_utime + before_self.ru_stime)
    workers_cpu = sum(after_children[pid] - before_children[pid] for pid in after_children if pid in before_children)
    return {
        "warm_p50_ms": statistics.median(trips) * 1e3,
        "warm_p99_ms": trips[int(len(trips) * 0.99)] * 1e3,
        "host_us": host / runs * 1e6,
        "workers_us": workers_cpu / runs * 1e6,
    }


async def fresh_p50(policy: Policy, rounds: int) -> float:
    async with Sandbox(policy.model_copy(update={"fresh_process_per_run": True}), workers=1) as sb:
        for _ in range(5):
            await sb.run(TRIVIAL_CODE)
        trips = []
        for _ in range(rounds):
            start = time.perf_counter()
            await sb.run(TRIVIAL_CODE)
            trips.append(time.perf_counter() - start)
    return statistics.median(trips) * 1e3


async def start_ms(policy: Policy, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sb = Sandbox(policy, workers=1)
        await sb.start()
        times.append(time.perf_counter() - start)
        await sb.close()
    return statistics.median(times) * 1e3


async def main(options: argparse.Namespace) -> None:
    unsupported = await host_unsupported()
    rows = policies(unsupported)
    figures: dict[str, dict[str, float]] = {}
    for label, policy in rows.items():
        print(f"measuring {label}", file=sys.stderr)
        row = await warm_and_cpu(policy, options.rounds, options.runs, options.workers)
        row["fresh_p50_ms"] = await fresh_p50(policy, options.fresh_rounds)
        row["start_ms"] = await start_ms(policy, options.repeats)
        figures[label] = row
    if unsupported:
        print(f"\nlayers this host does not provide (skipped in every row): {', '.join(unsupported)}")
    columns = [
        ("warm_p50_ms", "warm p50 ms"),
        ("warm_p99_ms", "warm p99 ms"),
        ("host_us", "host CPU/run us"),
        ("workers_us", "worker CPU/run us"),
        ("fresh_p50_ms", "fresh p50 ms"),
        ("start_ms", "start() ms"),
    ]
    print(f"\n{'':<20}" + "".join(f"{title:>22}" for _, title in columns))
    core = figures["core"]
    for label, row in figures.items():
        cells = "".join(f"{row[key]:>13.3g} ({row[key] / core[key]:4.2f}x)" for key, _ in columns)
        print(f"{label:<20}{cells}")
    print("\n(x) = ratio to 'core' (every layer skipped) from this run; lower is better.")


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000, help="warm round trips per row (default 1000)")
    parser.add_argument("--runs", type=int, default=3000, help="runs of the CPU measurement (default 3000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=psutil.cpu_count() or 2,
        help="workers of the warm pool (default: number of CPUs)",
    )
    parser.add_argument(
        "--fresh-rounds", type=int, default=100, help="round trips with a new process per run (default 100)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="Sandbox.start() repeats (default 5)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_options(sys.argv[1:])))
