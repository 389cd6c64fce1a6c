"""Herald's metrics: per-worker counters in shared memory, summed over the workers at scrape time.

Why not prometheus-client's multiprocess mode (used before): it takes a lock and packs a
value into a shared file on every observation, about 3 µs a request, a tenth of what a
bare aiohttp request costs. Here each worker owns a store no other process writes, so an
observation is a float add into a memoryview, with no lock. The store is a file mapping
(MAP_SHARED), so whatever a worker counted is still there after it exits, is replaced on
SIGHUP or is killed: the scraping worker reads every worker's store and sums. A dead
worker's gauges are dropped (`forget_process`); its counters keep counting.
prometheus-client only writes the text format.
"""

from __future__ import annotations

import asyncio
import bisect
import mmap
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from server.realtime.hub import Hub

SYNC_INTERVAL = 0.25  # the default of metrics.sync_interval
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
CAPACITY = 16384  # values per worker store (128 KiB of sparse file); slot 0 takes any overflow
KEYS, VALUES, DEAD = ".keys", ".values", ".dead"

_shared_dir: str | None = None  # set in the supervisor before it forks: the workers inherit it


def enable_multiprocess(directory: str) -> None:
    """Before forking workers: each worker then keeps its store in `directory`, and a
    scrape in any worker sums them all."""
    global _shared_dir
    _shared_dir = directory


def forget_process(pid: int, directory: str | None = None) -> None:
    """A worker is gone (the supervisor reaped it): its gauges no longer count, its counters still do."""
    directory = directory or _shared_dir
    if directory is None:
        return
    for keys in Path(directory).glob(f"{pid}-*{KEYS}"):
        keys.with_suffix(DEAD).touch()


class Store:
    """One process's values: a flat array of float64, and the key of each slot.

    A key is (family, label values, part); part is "" for counters and gauges, and a
    bucket number or "sum" for the histogram. A slot's key is written to the `.keys`
    file before the slot is first used, so a reader never sees a value it cannot name.
    """

    def __init__(self, directory: str | None) -> None:
        self.slots: dict[tuple[str, tuple[str, ...], str], int] = {}
        self._keys = None
        if directory is None:
            self._memory: mmap.mmap | bytearray = bytearray(CAPACITY * 8)
        else:
            base = os.path.join(directory, f"{os.getpid()}-{os.urandom(4).hex()}")
            fd = os.open(base + VALUES, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, CAPACITY * 8)
                self._memory = mmap.mmap(fd, CAPACITY * 8)
            finally:
                os.close(fd)
            self._keys = open(base + KEYS, "ab", buffering=0)  # noqa: SIM115 (lives as long as the process)
        self.values = memoryview(self._memory).cast("d")
        self._next = 1

    def slot(self, family: str, labels: tuple[str, ...] = (), part: str = "") -> int:
        key = (family, labels, part)
        index = self.slots.get(key)
        if index is None:
            if self._next >= CAPACITY:
                return 0  # full: never expected (label values are bounded), never fatal
            index = self.slots[key] = self._next
            self._next += 1
            if self._keys is not None:
                self._keys.write(orjson.dumps([index, family, labels, part]) + b"\n")
        return index

    def close(self) -> None:
        """The file stays (the counts outlive the process); only this process lets go of it."""
        if self._keys is not None:
            self._keys.close()

    def items(self) -> Iterator[tuple[tuple[str, tuple[str, ...], str], float]]:
        values = self.values
        for key, index in self.slots.items():
            yield key, values[index]


def read_stores(directory: str) -> Iterator[tuple[bool, Iterable[tuple[tuple[str, tuple[str, ...], str], float]]]]:
    """Every store in the directory: (process alive, its keyed values)."""
    for keys_path in Path(directory).glob(f"*{KEYS}"):
        try:
            lines = keys_path.read_bytes().split(b"\n")[:-1]  # a line being written has no newline yet
            raw = keys_path.with_suffix(VALUES).read_bytes()
        except FileNotFoundError:
            continue
        values = memoryview(raw).cast("d")
        items = []
        for line in lines:
            index, family, labels, part = orjson.loads(line)
            items.append(((family, tuple(labels), part), values[index]))
        yield not keys_path.with_suffix(DEAD).exists(), items


class _Family:
    kind = ""

    def __init__(self, metrics: Metrics, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.store = metrics.store
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], _Child] = {}
        metrics.families.append(self)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Child(self.store, self.store.slot(self.name, values))
        return child


class _Child:
    __slots__ = ("index", "values")

    def __init__(self, store: Store, index: int) -> None:
        self.values, self.index = store.values, index

    def inc(self, amount: float = 1.0) -> None:
        self.values[self.index] += amount

    def set(self, value: float) -> None:
        self.values[self.index] = value


class Counter(_Family):
    kind = "counter"

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Gauge(_Family):
    kind = "gauge"  # summed over the live workers


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, metrics: Metrics, name: str, documentation: str) -> None:
        super().__init__(metrics, name, documentation)
        store = self.store
        self.buckets = [store.slot(name, (), str(n)) for n in range(len(LATENCY_BOUNDS) + 1)]
        self.sum = store.slot(name, (), "sum")

    def observe(self, seconds: float) -> None:
        values = self.store.values
        values[self.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)]] += 1.0
        values[self.sum] += seconds


class _Snapshot:
    """A collector for prometheus-client's text writer: families already summed."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class Metrics:
    def __init__(self, sync_interval: float = SYNC_INTERVAL, directory: str | None = None) -> None:
        """`directory`: where the workers' stores live (default: enable_multiprocess's; none:
        this process's figures only, in memory)."""
        self.sync_interval = sync_interval
        self.multiprocess_dir = directory or _shared_dir
        self.store = Store(self.multiprocess_dir)
        self.families: list[_Family] = []
        self.requests = Counter(
            self, "herald_http_requests", "HTTP requests by route and status", ("method", "route", "status")
        )
        self.latency = Histogram(self, "herald_http_request_duration_seconds", "HTTP request latency")
        self.connections = Gauge(self, "herald_connections", "Open real-time connections", ("transport",))
        self.published = Counter(self, "herald_events_published", "Events stored")
        self.delivered = Counter(self, "herald_events_delivered", "Events written to subscribers", ("transport",))
        self.slow_closes = Counter(self, "herald_slow_consumer_closes", "Connections closed as slow consumers")
        self._request_slots: dict[tuple[str, str, int], int] = {}
        self._synced: Tally[str] = Tally()
        self._synced_slow = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """The per-request hot path: three float adds, no lock, no system call."""
        if method not in KNOWN_METHODS:
            method = "OTHER"  # clients choose the method: keep label values (and memory) bounded
        key = (method, route, status)
        index = self._request_slots.get(key)
        if index is None:
            index = self._request_slots[key] = self.requests.labels(method, route, str(status)).index
        values = self.store.values
        values[index] += 1.0
        latency = self.latency
        values[latency.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)]] += 1.0
        values[latency.sum] += seconds

    # -- scrape -----------------------------------------------------------------------

    def totals(self) -> dict[tuple[str, tuple[str, ...], str], float]:
        """Every key summed over the stores: every worker's, or this process's alone."""
        kinds = {family.name: family.kind for family in self.families}
        stores = read_stores(self.multiprocess_dir) if self.multiprocess_dir else [(True, self.store.items())]
        totals: dict[tuple[str, tuple[str, ...], str], float] = {}
        for alive, items in stores:
            for key, number in items:
                if alive or kinds.get(key[0]) != "gauge":
                    totals[key] = totals.get(key, 0.0) + number
        return totals

    def render(self, hub: Hub | None = None) -> bytes:
        if hub is not None:
            self.sync_hub(hub)  # this worker's own figures as of now
        totals = self.totals()
        by_family: dict[str, dict[tuple[str, ...], dict[str, float]]] = {}
        for (family, labels, part), number in totals.items():
            by_family.setdefault(family, {}).setdefault(labels, {})[part] = number
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot([self._family(f, by_family.get(f.name, {})) for f in self.families]))
        return generate_latest(registry)

    @staticmethod
    def _family(family: _Family, samples: dict[tuple[str, ...], dict[str, float]]) -> Metric:
        if not family.labelnames:
            samples.setdefault((), {})  # an unlabelled family always shows, at 0 if nothing happened
        if isinstance(family, Histogram):
            out = HistogramMetricFamily(family.name, family.documentation, labels=[])
            for labels, parts in sorted(samples.items()):
                running, buckets = 0.0, []
                for n, bound in enumerate((*LATENCY_BOUNDS, float("inf"))):
                    running += parts.get(str(n), 0.0)
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
                out.add_metric(list(labels), buckets, parts.get("sum", 0.0))
            return out
        cls = CounterMetricFamily if isinstance(family, Counter) else GaugeMetricFamily
        out = cls(family.name, family.documentation, labels=list(family.labelnames))
        for labels, parts in sorted(samples.items()):
            out.add_metric(list(labels), parts.get("", 0.0))
        return out

    # -- the hub's plain counters -----------------------------------------------------

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
        """Every sync_interval, and once more when the worker stops (the job is cancelled
        after the connections closed): a retiring worker's last deliveries still count."""
        try:
            while True:
                self.sync_hub(hub)
                await asyncio.sleep(self.sync_interval)
        finally:
            self.sync_hub(hub)
