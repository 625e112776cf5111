#!/usr/bin/env python3
"""Benchmark a trivial run through ``sandbox serve`` against the same run in-process, in one invocation.

What it measures, in this order, with the same number of workers on each
side: the latency of ``--runs`` sequential trivial runs (``x = 1``) on an
in-process ``Sandbox``; the same through a ``sandbox serve`` subprocess on
127.0.0.1 (``--insecure-no-auth``, one keep-alive connection, the
``sandbox.client.Client``); the same requests from the standard library's
``http.client`` on one keep-alive connection, which leaves out the Python
client's own cost (httpx, decoding into a ``Result``) and so measures the
service as any HTTP client sees it; then throughput with ``--concurrency``
runs in flight, in-process and through HTTP. It prints p50/p99 of each, the
ratio of each HTTP p50 to the in-process p50 (the target is at most 4), and
both throughputs, and writes them as JSON with ``--json``.

    python scripts/bench_http.py --runs 2000 --concurrency 32 --workers 2

Must never: print a figure it did not measure, or leave the server running
(it is stopped with SIGTERM, then killed if it does not stop).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sandbox import Sandbox
from sandbox.client import Client

TRIVIAL = "x = 1"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def latencies(run: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await run()
        samples.append(time.perf_counter() - start)
    return samples


async def throughput(run: Callable[[], Awaitable[object]], count: int, concurrency: int) -> float:
    remaining = count

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await run()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "sandbox", "serve", "--insecure-no-auth", "--port", "0", "--workers", str(workers)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        process.kill()
        raise SystemExit(f"sandbox serve did not start: {line!r}")
    return process, match.group(1)


async def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + 60
    while (await client.http.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("sandbox serve did not become ready")
        await asyncio.sleep(0.1)


def bare_latencies(url: str, count: int) -> list[float]:
    """``count`` sequential ``POST /v1/runs`` from ``http.client`` on one keep-alive connection."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    body = json.dumps({"code": TRIVIAL}).encode()
    headers = {"content-type": "application/json"}
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            connection.request("POST", "/v1/runs", body, headers)
            answer = json.loads(connection.getresponse().read())
            samples.append(time.perf_counter() - start)
            if answer.get("ok") is not True:
                raise SystemExit(f"a trivial run failed through HTTP: {answer}")
    finally:
        connection.close()
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(samples) * 1000, 3),
    }


async def bench(options: argparse.Namespace) -> dict[str, object]:
    async with Sandbox(workers=options.workers) as sandbox:
        await latencies(lambda: sandbox.run(TRIVIAL), options.warmup)
        local = await latencies(lambda: sandbox.run(TRIVIAL), options.runs)
        local_throughput = await throughput(lambda: sandbox.run(TRIVIAL), options.runs, options.concurrency)
    process, url = start_server(options.workers)
    try:
        async with Client(url, connections=options.concurrency) as client:
            await wait_ready(client)
            await latencies(lambda: client.run(TRIVIAL), options.warmup)
            remote = await latencies(lambda: client.run(TRIVIAL), options.runs)
            remote_throughput = await throughput(lambda: client.run(TRIVIAL), options.runs, options.concurrency)
        await asyncio.to_thread(bare_latencies, url, options.warmup)
        bare = await asyncio.to_thread(bare_latencies, url, options.runs)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    local_figures, remote_figures, bare_figures = summary(local), summary(remote), summary(bare)
    return {
        "runs": options.runs,
        "concurrency": options.concurrency,
        "workers": options.workers,
        "in_process": {**local_figures, "throughput_runs_per_s": round(local_throughput, 1)},
        "http": {**remote_figures, "throughput_runs_per_s": round(remote_throughput, 1)},
        "http_bare_client": bare_figures,
        "p50_ratio_http_to_in_process": round(remote_figures["p50_ms"] / local_figures["p50_ms"], 2),
        "p50_ratio_bare_http_to_in_process": round(bare_figures["p50_ms"] / local_figures["p50_ms"], 2),
        "p50_ratio_target": 4.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per measurement (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="runs before each latency measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight for throughput (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="workers of both Sandboxes (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    report = uvloop.run(bench(options))
    for side in ("in_process", "http", "http_bare_client"):
        figures = report[side]
        rate = (
            f"  throughput {figures['throughput_runs_per_s']:8.1f} runs/s" if "throughput_runs_per_s" in figures else ""
        )
        print(f"{side:<16} p50 {figures['p50_ms']:8.3f} ms  p99 {figures['p99_ms']:8.3f} ms{rate}")
    for key, what in (
        ("p50_ratio_http_to_in_process", "through sandbox.client"),
        ("p50_ratio_bare_http_to_in_process", "through http.client"),
    ):
        ratio = report[key]
        print(f"p50 {what} / in-process: {ratio}x (target <= 4x): {'met' if ratio <= 4 else 'NOT met'}")
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
