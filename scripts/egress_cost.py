"""What egress costs: per worker start, per warm run, per connection.

Run as root; it re-runs itself inside a throwaway network, PID and mount
namespace holding the egress tests' world (``tests/egress/world.py``), so
every connection goes to that world's upstream namespace and nowhere else::

    python scripts/egress_cost.py [--starts 20] [--runs 200] [--connections 200]

Prints one JSON object with medians (ms). Compares a tenant with egress to
the same tenant without (which has no network at all), and a connection
made by a worker through its rules and pasta to one made directly from the
supervisor's namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_INSIDE = "--inside-world"

CONNECT_LOOP = """
import socket, time
times = []
for _ in range(count):
    started = time.perf_counter()
    sock = socket.create_connection((host, port))
    sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    while sock.recv(4096):
        pass
    sock.close()
    times.append(time.perf_counter() - started)
"""


async def measure(args: argparse.Namespace) -> dict:
    from sandbox import Sandbox
    from tests.egress.world import EGRESS, UPSTREAM, tenant

    tenants = {
        "egress_fresh": tenant(egress=EGRESS, fresh_process_per_run=True),
        "plain_fresh": tenant(fresh_process_per_run=True),
        "egress": tenant(egress=EGRESS),
        "plain": tenant(),
    }
    report: dict = {}
    async with Sandbox(tenants=tenants, workers=4) as sandbox:
        # Interleaved, so that a change in the machine's load hits both sides alike.
        for pair, count in ((("egress_fresh", "plain_fresh"), args.starts), (("egress", "plain"), args.runs)):
            times: dict[str, list[float]] = {name: [] for name in pair}
            for name in pair:
                await sandbox.run("x = 1", tenant=name)  # warm-up
            for _ in range(count):
                for name in pair:
                    started = time.perf_counter()
                    await sandbox.run("x = 1", tenant=name)
                    times[name].append(time.perf_counter() - started)
            for name in pair:
                report[f"run_ms_{name}"] = round(statistics.median(times[name]) * 1000, 2)
        result = await sandbox.run(
            CONNECT_LOOP, {"host": UPSTREAM, "port": 8080, "count": args.connections}, tenant="egress"
        )
        report["connection_ms_worker_through_pasta"] = round(statistics.median(result.outputs["times"]) * 1000, 3)
    direct = []
    for _ in range(args.connections):
        started = time.perf_counter()
        sock = socket.create_connection((UPSTREAM, 8080))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while sock.recv(4096):
            pass
        sock.close()
        direct.append(time.perf_counter() - started)
    report["connection_ms_direct_from_supervisor"] = round(statistics.median(direct) * 1000, 3)
    report["egress_cost_per_worker_start_ms"] = round(report["run_ms_egress_fresh"] - report["run_ms_plain_fresh"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20, help="fresh-worker runs per tenant")
    parser.add_argument("--runs", type=int, default=200, help="warm runs per tenant")
    parser.add_argument("--connections", type=int, default=200, help="connections per side")
    parser.add_argument(_INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside_world:
        if os.geteuid() != 0:
            sys.exit("run as root: the throwaway world needs network namespaces and a veth")
        command = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]
        sys.exit(subprocess.run([*command, sys.executable, __file__, *sys.argv[1:], _INSIDE]).returncode)
    sys.path.insert(0, str(REPO))
    import uvloop

    from tests.egress import world

    world._private_hosts_file()
    world._start_upstream()
    print(json.dumps(uvloop.run(measure(args)), indent=2))


if __name__ == "__main__":
    main()
