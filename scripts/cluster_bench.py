#!/usr/bin/env python3
"""What going through Ray costs: ClusterSandbox against a local Sandbox, on this one machine.

What it does, in one invocation:

* a local ``Sandbox(workers=W)``: the p50 and p99 of a trivial run (``result
  = 1``), one run at a time on warm workers, and the throughput of N trivial
  runs submitted at once;
* a one-node local Ray cluster, ``ClusterSandbox(workers_per_node=W)``: the
  same two figures;
* a second node added to that cluster (two simulated nodes, W workers each):
  the throughput again, once the client has found the node.

On one machine the simulated nodes share its cores, so the second node
shows the cost of the extra layer, not scale.

How to run (from the repository root, with the ``[cluster]`` extra)::

    python scripts/cluster_bench.py                     # --rounds 300 --runs 1000 --workers 2

Must never: start Ray outside a network namespace with only loopback. It
re-executes itself under ``unshare --net`` (see ``sandbox.cluster.offline``)
when it is not in one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import Sandbox
from sandbox.cluster.offline import loopback_only, node_args, only_loopback, start_local_cluster, stop_local_cluster

TRIVIAL = "result = 1"


async def latency(sb, rounds: int) -> dict[str, float]:
    for _ in range(20):
        await sb.run(TRIVIAL)
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await sb.run(TRIVIAL)
        samples.append(time.perf_counter() - started)
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": statistics.median(samples) * 1e3, "p99_ms": cuts[98] * 1e3}


async def throughput(sb, runs: int) -> float:
    await asyncio.gather(*[sb.run(TRIVIAL) for _ in range(20)])
    started = time.perf_counter()
    await asyncio.gather(*[sb.run(TRIVIAL) for _ in range(runs)])
    return runs / (time.perf_counter() - started)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    from sandbox.cluster import ClusterSandbox

    figures: dict[str, object] = {"cpus": os.cpu_count(), "workers_per_node": args.workers}
    async with Sandbox(workers=args.workers) as local:
        figures["local"] = {**await latency(local, args.rounds), "runs_per_s": await throughput(local, args.runs)}
    cluster = start_local_cluster(nodes=1, cpus=args.workers)
    try:
        async with ClusterSandbox(workers_per_node=args.workers) as sb:
            one = await latency(sb, args.rounds)
            one["runs_per_s"] = await throughput(sb, args.runs)
            figures["cluster_1_node"] = one
            cluster.add_node(**node_args("b", args.workers))
            while len([node for node in sb.nodes if node.up]) < 2:
                await asyncio.sleep(0.2)
            figures["cluster_2_nodes"] = {"runs_per_s": await throughput(sb, args.runs)}
    finally:
        stop_local_cluster(cluster)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="sequential runs timed for the latency")
    parser.add_argument("--runs", type=int, default=1000, help="runs submitted at once for the throughput")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local Sandbox and of each node")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not only_loopback():
        return subprocess.call(loopback_only([sys.executable, *sys.argv]))
    figures = asyncio.run(measure(args))
    for name in ("local", "cluster_1_node", "cluster_2_nodes"):
        row = figures[name]
        assert isinstance(row, dict)
        cells = [f"{key} {value:8.2f}" for key, value in row.items()]
        print(f"{name:16s} " + "   ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
