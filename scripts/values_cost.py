#!/usr/bin/env python3
"""What a 1,000,000-row DataFrame output costs, against a bare run.

What it does: on one warm worker, measures the median over ``--rounds``
runs of each row: the wall time end to end (``await sb.run``, as a caller
sees it), the run's CPU time in the worker (``Result.stats.cpu_s``: the code
and the snapshot of its outputs), and the CPU time of this process, the
supervisor (``getrusage``: reading the reply and building the values). The
CPU figures hold on a loaded machine; the wall times do not. Rows:

* ``bare run``: ``x = 1``;
* ``build, not returned``: the code builds the frame into a private name,
  which is never an output, so the row shows the building alone;
* ``DataFrame output``: the same frame returned; it travels as Arrow IPC
  and comes back a real DataFrame, checked by ``sandbox.values``;
* ``as Opaque (pickled)``: the frame returned inside a list, which travels
  as cloudpickle and comes back an ``Opaque`` (what every frame cost before);
* ``numpy array output``: one float64 column alone, as ``.npy``.

It also prints the size of each value on the wire. The frame has five
columns: int64, float64, bool, a 7-character string and a datetime64.

How to run, from the repository root::

    python scripts/values_cost.py
    python scripts/values_cost.py --rows 100000 --rounds 5   # quicker

Must never: print a figure it did not measure in this invocation.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sandbox import Opaque, Policy, Sandbox

MiB = 1024 * 1024
BUILD = """
import numpy as np, pandas as pd
_n = {rows}
_frame = pd.DataFrame({{
    "id": np.arange(_n, dtype=np.int64),
    "value": np.linspace(0.0, 1.0, _n),
    "flag": np.arange(_n) % 3 == 0,
    "label": pd.Categorical.from_codes(np.arange(_n) % 1000, [f"item{{i:03d}}" for i in range(1000)]).astype(str),
    "when": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(_n), unit="s"),
}})
"""
ROWS = {
    "bare run": "x = 1",
    "build, not returned": "{build}",
    "DataFrame output": "{build}\nframe = _frame",
    "as Opaque (pickled)": "{build}\nboxed = [_frame]",
    "numpy array output": "{build}\narray = _frame['value'].to_numpy()",
}


def _host_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(sb: Sandbox, code: str, rounds: int) -> tuple[float, float, float, dict[str, object]]:
    """Median wall, worker CPU and supervisor CPU, in seconds, and the last run's outputs."""
    outputs: dict[str, object] = {}
    walls, workers, hosts = [], [], []
    for _ in range(rounds):
        started, host_started = time.perf_counter(), _host_cpu_s()
        result = await sb.run(code)
        walls.append(time.perf_counter() - started)
        hosts.append(_host_cpu_s() - host_started)
        workers.append(result.stats.cpu_s)
        outputs = result.outputs
    return statistics.median(walls), statistics.median(workers), statistics.median(hosts), outputs


def _wire_size(value: object) -> str:
    from sandbox.runtime import values

    if isinstance(value, Opaque):
        return f"{value.size / MiB:.1f} MiB (pickle)"
    encoded = values.encode(value)
    return f"{len(encoded) / MiB:.1f} MiB" if encoded else "-"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    policy = Policy(
        allowed_modules=["numpy.*", "pandas.*"],
        memory_mb=2048,
        wall_time_s=120,
        cpu_time_s=60,
        max_result_bytes=256 * MiB,
        max_reply_bytes=256 * MiB,
    )
    build = BUILD.format(rows=args.rows)
    async with Sandbox(policy, workers=1) as sb:
        await sb.run(build)  # warm: the worker's first pandas work
        print(f"{args.rows:,} rows, median of {args.rounds} runs, one warm worker")
        print(f"{'row':<24}{'wall ms':>10}{'worker CPU ms':>15}{'host CPU ms':>13}  on the wire")
        for label, template in ROWS.items():
            wall, worker, host, outputs = await _measure(sb, template.format(build=build), args.rounds)
            sizes = ", ".join(_wire_size(value) for value in outputs.values()) or "-"
            print(f"{label:<24}{wall * 1000:>10.1f}{worker * 1000:>15.1f}{host * 1000:>13.1f}  {sizes}")


if __name__ == "__main__":
    uvloop.run(main())
