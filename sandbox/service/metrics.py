"""Prometheus metrics of ``sandbox serve``.

Owns: the metric families (runs by tenant and outcome, run duration, queue
depth and runs in flight by tenant, workers by state, event-loop lag, quota
refusals), on a registry of the service's own, and the loop-lag probe.

Must never: read the Sandbox from another thread. Gauges are refreshed on
the event loop (by the lag probe, and before each scrape of ``/metrics``),
from ``Sandbox.stats()``; a scrape on a separate port (served by a thread)
reads the last refresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server

from sandbox.stats import SandboxStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("sandbox_runs", "Runs that ended, by tenant and outcome", ["tenant", "outcome"], registry=r)
        self.duration = Histogram(
            "sandbox_run_duration_seconds",
            "Time from submission to outcome (queueing included)",
            ["tenant"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.quota_refusals = Counter(
            "sandbox_quota_refusals", "Runs refused with 429 (QuotaExceeded)", ["tenant", "quota"], registry=r
        )
        self.queue_depth = Gauge("sandbox_queue_depth", "Runs waiting for a worker", ["tenant"], registry=r)
        self.in_flight = Gauge("sandbox_runs_in_flight", "Runs on a worker", ["tenant"], registry=r)
        self.workers = Gauge("sandbox_workers", "Worker processes by state", ["state"], registry=r)
        self.loop_lag = Gauge("sandbox_event_loop_lag_seconds", "Latest event-loop lag sample", registry=r)
        self.loop_lag_histogram = Histogram(
            "sandbox_event_loop_lag_distribution_seconds", "Event-loop lag samples", buckets=_LAG_BUCKETS, registry=r
        )
        self._loaded: set[str] = set()  # tenants whose gauges the last refresh set from their load

    def run_ended(self, tenant: str, outcome: str, seconds: float) -> None:
        self.runs.labels(tenant, outcome).inc()
        self.duration.labels(tenant).observe(seconds)

    def refused(self, tenant: str, quota: str) -> None:
        self.quota_refusals.labels(tenant, quota).inc()

    def refresh(self, stats: SandboxStats) -> None:
        """Set the gauges from a snapshot: the tenants in it, and back to 0 those that had load last time.

        A tenant's gauges appear with its first load. The snapshot holds the
        tenants with load only, so a refresh costs in proportion to them,
        not to the tenants configured."""
        for state, count in stats.workers.items():
            self.workers.labels(state).set(count)
        for tenant in self._loaded - stats.tenants.keys():
            self.queue_depth.labels(tenant).set(0)
            self.in_flight.labels(tenant).set(0)
        for tenant, figures in stats.tenants.items():
            self.queue_depth.labels(tenant).set(figures.queued)
            self.in_flight.labels(tenant).set(figures.running)
        self._loaded = set(stats.tenants)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve_on_port(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on a port of its own (prometheus-client's server thread)."""
        start_http_server(port, addr=host, registry=self.registry)

    async def probe_loop_lag(self, interval_s: float, on_sample: Callable[[], None]) -> None:
        """Sleep ``interval_s`` again and again; how late each wake-up is, is the loop's lag.
        ``on_sample`` runs after each sample (the service refreshes its gauges there)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval_s)
            lag = max(0.0, loop.time() - before - interval_s)
            self.loop_lag.set(lag)
            self.loop_lag_histogram.observe(lag)
            on_sample()
