"""Prometheus metrics: pools, volumes, RPCs, external commands and reclaimed pending volumes.

Pool figures are collected at scrape time from the backends' own capacity views (a custom collector), so a scrape
never shows numbers older than the pool's cache, and nothing polls when nobody scrapes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from localdisk.discovery import Discovers
from localdisk.errors import LocalDiskError
from localdisk.manager import VolumeManager
from localdisk.model import Capacity
from localdisk.qos import IO_MAX, VolumeQos

log = logging.getLogger(__name__)
PREFIX = "localdisk"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpc_total = Counter(
            f"{PREFIX}_rpc_requests",
            "CSI RPCs handled, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            f"{PREFIX}_rpc_duration_seconds",
            "CSI RPC latency, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.command_seconds = Histogram(
            f"{PREFIX}_command_duration_seconds",
            "External command latency, by program",
            ["program"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
        )
        self.command_failures = Counter(
            f"{PREFIX}_command_failures",
            "External commands that exited non-zero or timed out, by program",
            ["program"],
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_total.labels(method, code).inc()
        self.rpc_seconds.labels(method, code).observe(seconds)

    def observe_command(self, argv: Sequence[str], seconds: float, ok: bool) -> None:
        program = argv[0].rsplit("/", 1)[-1] if argv else "?"
        self.command_seconds.labels(program).observe(seconds)
        if not ok:
            self.command_failures.labels(program).inc()

    def watch_pools(self, manager: VolumeManager, loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(PoolCollector(manager, loop))

    def watch_io_limits(self, io: VolumeQos) -> None:
        self.registry.register(IoLimitCollector(io))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104
        log.info("metrics on http://%s/metrics", address)


class PoolCollector(Collector):
    """Reads pool capacity and volume counts from the running server's event loop at scrape time."""

    def __init__(self, manager: VolumeManager, loop: asyncio.AbstractEventLoop) -> None:
        self.manager = manager
        self.loop = loop

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        size = GaugeMetricFamily(f"{PREFIX}_pool_size_bytes", "Pool size", labels=["backend", "pool"])
        free = GaugeMetricFamily(
            f"{PREFIX}_pool_free_bytes", "Bytes a new volume can still get", labels=["backend", "pool"]
        )
        allocated = GaugeMetricFamily(
            f"{PREFIX}_pool_allocated_bytes",
            "Bytes provisioned to volumes (virtual for thin)",
            labels=["backend", "pool"],
        )
        volumes = GaugeMetricFamily(f"{PREFIX}_volumes", "Volumes in the pool", labels=["backend", "pool"])
        details = GaugeMetricFamily(
            f"{PREFIX}_pool_detail",
            "Backend-specific pool figures (thin data/metadata use...)",
            labels=["backend", "pool", "figure"],
        )
        try:
            figures = asyncio.run_coroutine_threadsafe(self._figures(), self.loop).result(timeout=10)
        except (FutureTimeout, LocalDiskError, RuntimeError) as exc:
            log.warning("pool metrics unavailable: %s", exc)
            figures = []
        for (backend, pool), cap, sizes in figures:
            labels = [backend, pool]
            size.add_metric(labels, cap.total_bytes)
            free.add_metric(labels, cap.available_bytes)
            allocated.add_metric(labels, cap.details.get("allocated_bytes", sum(sizes)))
            volumes.add_metric(labels, len(sizes))
            for figure, value in cap.details.items():
                details.add_metric([*labels, figure], value)
        yield from (size, free, allocated, volumes, details)
        reclaimed = CounterMetricFamily(
            f"{PREFIX}_pending_reclaimed",
            "Pending volumes (left by creates cancelled or killed half-way) removed in the background",
            labels=["backend", "pool"],
        )
        counts = dict(self.manager.pending_reclaimed)  # a copy: the event loop may add to it meanwhile
        for backend, pool in self.manager.pools():
            reclaimed.add_metric([backend, pool], counts.get((backend, pool), 0))
        yield reclaimed
        yield from self._states()

    def _states(self) -> Iterable[GaugeMetricFamily]:
        """Whether each pool is up, and why it is not (`localdisk.availability`); read without the event loop."""
        up = GaugeMetricFamily(
            f"{PREFIX}_pool_up", "1 when the pool is usable, 0 when it is down", labels=["backend", "pool"]
        )
        down = GaugeMetricFamily(
            f"{PREFIX}_pool_unavailable",
            "1 for a pool that is down, with the reason (the other pools and the Node service keep working)",
            labels=["backend", "pool", "reason"],
        )
        disks = GaugeMetricFamily(
            f"{PREFIX}_disks_discovered",
            "Disks a pool's [match] rules matched at the last discovery pass, by outcome: used, blank (left alone"
            " without setup = true) or refused (the reason is in the log)",
            labels=["backend", "pool", "outcome"],
        )
        for (backend, pool), state in self.manager.pool_states().items():
            up.add_metric([backend, pool], 1 if state.up else 0)
            if not state.up:
                down.add_metric([backend, pool, state.reason or "unknown"], 1)
            inner = self.manager.backends[(backend, pool)].inner
            if isinstance(inner, Discovers) and inner.finds_disks:
                outcomes = collections.Counter(verdict.partition(":")[0] for verdict in dict(inner.discovered).values())
                for outcome in ("used", "blank", "refused"):
                    disks.add_metric([backend, pool, outcome], outcomes.get(outcome, 0))
        yield from (up, down, disks)

    async def _figures(self) -> list[tuple[tuple[str, str], Capacity, list[int]]]:
        out: list[tuple[tuple[str, str], Capacity, list[int]]] = []
        for key in self.manager.pools():
            backend = self.manager.backends[key]
            out.append((key, await backend.capacity(), [v.size_bytes for v in await backend.list_volumes()]))
        return out


class IoLimitCollector(Collector):
    """The I/O limits of each volume (`localdisk.qos`), and per publication what io.max holds and the throttled time
    io.stat reports where the kernel keeps one (iocost's cost.wait and cost.indelay). Read from files at scrape time."""

    def __init__(self, io: VolumeQos) -> None:
        self.io = io

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        limit = GaugeMetricFamily(
            f"{PREFIX}_volume_io_limit",
            "I/O limit of a volume, by kind (rbps, wbps: bytes/s; riops, wiops: I/Os/s); no sample: no limit",
            labels=["volume", "kind"],
        )
        enforced = GaugeMetricFamily(
            f"{PREFIX}_volume_io_limit_enforced",
            "The limit io.max holds for the volume's device in the cgroup of a pod using it, by kind",
            labels=["volume", "pod", "kind"],
        )
        throttled = CounterMetricFamily(
            f"{PREFIX}_volume_io_throttled_seconds",
            "Time the volume's I/O in a pod's cgroup waited for the kernel's throttling (io.stat, where reported)",
            labels=["volume", "pod"],
        )
        try:
            records = self.io.records()
        except OSError as exc:
            log.warning("I/O limit metrics unavailable: %s", exc)
            records = []
        for record in records:
            for attr, kind in IO_MAX.items():
                value = getattr(record.limits, attr)
                if value is not None:
                    limit.add_metric([record.volume_id, kind], value)
            for applied in self.io.applied(record):
                for kind, value in applied.io_max.items():
                    enforced.add_metric([record.volume_id, applied.pod_uid, kind], value)
                if applied.throttled_usec is not None:
                    throttled.add_metric([record.volume_id, applied.pod_uid], applied.throttled_usec / 1e6)
        yield from (limit, enforced, throttled)
