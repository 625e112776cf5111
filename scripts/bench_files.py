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

and prints p50 and p90 of each, and each p50 minus the bare run's.

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


async def measure(rounds: int) -> dict[str, list[float]]:
    policy = Policy(wall_time_s=30, cpu_time_s=30, memory_mb=512, max_result_bytes=16 * MiB)
    timings: dict[str, list[float]] = {name: [] for name in CASES}
    async with Sandbox(policy, workers=1) as sb:
        for code, inputs, files in CASES.values():  # warm every path once
            await sb.run(code, inputs, files=files)
        for _ in range(rounds):
            for name, (code, inputs, files) in CASES.items():
                started = time.perf_counter()
                result = await sb.run(code, inputs, files=files)
                timings[name].append(time.perf_counter() - started)
                if name.startswith("file") and "out" in name:
                    assert len(result.files["data.bin"]) == SIZE
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="runs of each case (default 40)")
    args = parser.parse_args()
    timings = asyncio.run(measure(args.rounds))
    bare = statistics.median(timings["bare"])
    print(f"{'case (10 MiB)':<20}{'p50 ms':>10}{'p90 ms':>10}{'p50 - bare ms':>16}")
    for name, values in timings.items():
        values.sort()
        p50, p90 = statistics.median(values), values[int(0.9 * (len(values) - 1))]
        print(f"{name:<20}{p50 * 1000:>10.2f}{p90 * 1000:>10.2f}{(p50 - bare) * 1000:>16.2f}")


if __name__ == "__main__":
    main()
