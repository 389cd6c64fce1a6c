"""Prometheus metrics, summed over every worker process (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from server.realtime.hub import Hub

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL = 1.0
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def enable_multiprocess(directory: str) -> None:
    """Before forking workers: every metric value then lives in a per-process file there."""
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()


def forget_process(pid: int) -> None:
    """A worker is gone: drop its live gauges (its counters still count)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "herald_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram("herald_http_request_duration_seconds", "HTTP request latency", registry=r)
        self.connections = Gauge(
            "herald_connections", "Open real-time connections", ["transport"], multiprocess_mode="livesum", registry=r
        )
        self.published = Counter("herald_events_published", "Events stored", registry=r)
        self.delivered = Counter("herald_events_delivered", "Events written to subscribers", ["transport"], registry=r)
        self.slow_closes = Counter("herald_slow_consumer_closes", "Connections closed as slow consumers", registry=r)
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._synced: Tally[str] = Tally()
        self._synced_slow = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"  # clients choose the method: keep label values (and memory) bounded
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:  # labels() costs a lookup and a lock; routes and statuses are few
            child = self._request_children[key] = self.requests.labels(method, route, str(status))
        child.inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def sync_hub(self, hub: Hub) -> None:
        """Fold the hub's plain counters in: no metric call on the per-delivery hot path."""
        for transport, count in hub.delivered.items():
            delta = count - self._synced[transport]
            if delta:
                self.delivered.labels(transport).inc(delta)
                self._synced[transport] = count
        if hub.slow_closes > self._synced_slow:
            self.slow_closes.inc(hub.slow_closes - self._synced_slow)
            self._synced_slow = hub.slow_closes
        open_by_kind = Tally(conn.kind for conn in hub.connections)
        for transport in ("ws", "sse"):
            self.connections.labels(transport).set(open_by_kind[transport])

    async def sync_forever(self, hub: Hub) -> None:
        while True:
            self.sync_hub(hub)
            await asyncio.sleep(SYNC_INTERVAL)
