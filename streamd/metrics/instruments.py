"""Plain counters and histograms that the hot path updates: no locks, no prometheus.

Every instrument here is owned by the broker's event loop: only code running on the
loop updates it, and the scrape reads it through a snapshot taken on the loop
(``streamd.metrics.snapshot``), so an update costs a few attribute increments and
nothing is ever torn. ``streamd.metrics.collector`` turns snapshots into Prometheus
metric families on the HTTP server's thread.

Counting happens per request or per batch, never per record.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

#: gRPC handling time: sub-millisecond buckets for the broker's typical 20-500 us RPCs,
#: up to 10 s (go-grpc-prometheus' upper range) for long polls.
RPC_BUCKETS_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                       0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: fsync time: from a page-cache-only device (tens of us) to a struggling disk.
FSYNC_BUCKETS_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Fixed upper bounds (le); ``counts[i]`` holds observations in bucket i only (not
    cumulative); the last cell is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts = list(self.counts)
        h.sum = self.sum
        return h


class TopicTraffic:
    """What went in and out of one topic through the log RPCs since start-up."""

    __slots__ = ("records_produced", "bytes_produced", "records_fetched", "bytes_fetched", "subscribers")

    def __init__(self) -> None:
        self.records_produced = 0
        self.bytes_produced = 0
        self.records_fetched = 0
        self.bytes_fetched = 0
        #: Subscribe streams open now.
        self.subscribers = 0


class Traffic:
    """Per-topic traffic, created on a topic's first produce/fetch/subscribe."""

    __slots__ = ("topics",)

    def __init__(self) -> None:
        self.topics: dict[str, TopicTraffic] = {}

    def topic(self, name: str) -> TopicTraffic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = TopicTraffic()
        return t

    def produced(self, name: str, records: int, nbytes: int) -> None:
        t = self.topics.get(name) or self.topic(name)
        t.records_produced += records
        t.bytes_produced += nbytes

    def fetched(self, name: str, records: int, nbytes: int) -> None:
        t = self.topics.get(name) or self.topic(name)
        t.records_fetched += records
        t.bytes_fetched += nbytes


@dataclass(eq=False)
class RpcStats:
    """One gRPC method (go-grpc-prometheus' grpc_service/grpc_method/grpc_type)."""

    service: str
    method: str
    type: str
    started: int = 0
    #: Go's status code names (``OK``, ``NotFound``, ...) -> RPCs finished with it.
    handled: dict[str, int] = None  # type: ignore[assignment]
    seconds: Histogram = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.handled = {}
        self.seconds = Histogram(RPC_BUCKETS_SECONDS)

    def finished(self, code: str, seconds: float) -> None:
        self.handled[code] = self.handled.get(code, 0) + 1
        self.seconds.observe(seconds)
