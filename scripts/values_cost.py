#!/usr/bin/env python3
"""What a 1,000,000-row DataFrame output costs, against a bare run.

What it does: on one warm worker, times end to end (``await sb.run``, as a
caller sees it) the median of ``--rounds`` runs of each row:

* ``bare run``: ``x = 1``;
* ``build, not returned``: the code builds the frame into a private name,
  which is never an output, so the row shows the building alone;
* ``DataFrame output``: the same frame returned; it travels as Arrow IPC
  and comes back a real DataFrame, checked by ``sandbox.values``;
* ``as Opaque (pickled)``: the frame returned inside a list, which travels
  as cloudpickle and comes back an ``Opaque`` (what every frame cost before);
* ``numpy array output``: one float64 column alone, as ``.npy``.

It also prints the size of each value on the wire. The frame has five
columns: int64, float64, bool, a string of 6 to 7 characters and a
datetime64.

How to run, from the repository root::

    python scripts/values_cost.py
    python scripts/values_cost.py --rows 100000 --rounds 5   # quicker

Must never: print a figure it did not measure in this invocation.
"""

from __future__ import annotations

import argparse
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
    "label": pd.Series(np.arange(_n) % 1000).map("item{{:03d}}".format).astype(str),
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


async def _time(sb: Sandbox, code: str, rounds: int) -> tuple[float, dict[str, object]]:
    outputs: dict[str, object] = {}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        outputs = (await sb.run(code)).outputs
        times.append(time.perf_counter() - started)
    return statistics.median(times), outputs


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
        bare = None
        print(f"{args.rows:,} rows, median of {args.rounds} runs, one warm worker")
        print(f"{'row':<24}{'wall ms':>10}{'vs bare':>10}  on the wire")
        for label, template in ROWS.items():
            median, outputs = await _time(sb, template.format(build=build), args.rounds)
            bare = bare or median
            sizes = ", ".join(_wire_size(value) for value in outputs.values()) or "-"
            print(f"{label:<24}{median * 1000:>10.1f}{median / bare:>9.0f}x  {sizes}")


if __name__ == "__main__":
    uvloop.run(main())
