#!/usr/bin/env python3
"""What a file for one run costs: 10 MiB in through ``files=``, out through ``./out/``.

What it does: on one warm worker, interleaving the cases round by round so
that a change in the machine's load hits them all alike, it times

* ``bare``: a trivial run (``x = 1``);
* ``file in``: the same run with one 10 MiB file in ``files=`` (checked on
  the host, sent in the request, written under the run's cwd, compared after
  the run to see whether the code changed it);
* ``file out``: a run that writes 10 MiB to ``./out/``, collected by the
  worker and returned in ``Result.files``;
* ``file in and out``: both, the code copying the input to ``./out/``;
* ``bytes in and out``: for comparison, the same 10 MiB as a bytes input
  variable and a bytes output variable (pickled in, restricted-unpickled out).

and prints p50 and p90 of each, each p50 minus the bare run's, and the
median CPU time one run costs in the supervisor (all its threads) and in
the worker: on a loaded machine the wall-clock figures mostly measure the
wait for a core, the CPU figures what the work itself takes.

How to run (from the repository root; see docs/BENCHMARKS.md)::

    python scripts/bench_files.py --rounds 40

Must never: print a figure it did not measure, or compare figures from
different invocations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import psutil

from sandbox import Policy, Sandbox

MiB = 1024 * 1024
SIZE = 10 * MiB
PAYLOAD = os.urandom(SIZE)
CASES = {
    "bare": ("x = 1", {}, {}),
    "file in": ("x = 1", {}, {"in/data.bin": PAYLOAD}),
    "file out": (f"open('out/data.bin', 'wb').write(b'x' * {SIZE})", {}, {}),
    "file in and out": (
        "open('out/data.bin', 'wb').write(open('in/data.bin', 'rb').read())",
        {},
        {"in/data.bin": PAYLOAD},
    ),
    "bytes in and out": ("result = blob[::-1]", {"blob": PAYLOAD}, {}),
}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Case -> {"wall": [...], "host_cpu": [...], "worker_cpu": [...]}, seconds per run."""
    policy = Policy(wall_time_s=30, cpu_time_s=30, memory_mb=512, max_result_bytes=16 * MiB)
    figures = {name: {"wall": [], "host_cpu": [], "worker_cpu": []} for name in CASES}
    async with Sandbox(policy, workers=1) as sb:
        worker = None
        for code, inputs, files in CASES.values():  # warm every path once
            worker = psutil.Process((await sb.run(code, inputs, files=files)).stats.worker_pid)
        for _ in range(rounds):
            for name, (code, inputs, files) in CASES.items():
                host_before, worker_before = time.process_time(), _cpu(worker)
                started = time.perf_counter()
                result = await sb.run(code, inputs, files=files)
                figures[name]["wall"].append(time.perf_counter() - started)
                figures[name]["host_cpu"].append(time.process_time() - host_before)
                if result.stats.worker_pid == worker.pid:
                    figures[name]["worker_cpu"].append(_cpu(worker) - worker_before)
                else:  # the worker was replaced; its successor is measured from the next run on
                    worker = psutil.Process(result.stats.worker_pid)
                if name.startswith("file") and "out" in name:
                    assert len(result.files["data.bin"]) == SIZE
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="runs of each case (default 40)")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.rounds))
    bare = statistics.median(figures["bare"]["wall"])
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case (10 MiB)':<20}{'p50 ms':>9}{'p90 ms':>9}{'p50-bare':>10}{'host CPU':>10}{'worker CPU':>12}")
    for name, values in figures.items():
        wall = sorted(values["wall"])
        p50, p90 = statistics.median(wall), wall[int(0.9 * (len(wall) - 1))]
        host, worker = statistics.median(values["host_cpu"]), statistics.median(values["worker_cpu"] or [0.0])
        print(
            f"{name:<20}{p50 * 1000:>9.2f}{p90 * 1000:>9.2f}{(p50 - bare) * 1000:>10.2f}"
            f"{host * 1000:>10.2f}{worker * 1000:>12.2f}"
        )


if __name__ == "__main__":
    main()
