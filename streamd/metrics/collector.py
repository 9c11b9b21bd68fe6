"""Prometheus metric families from a ``Snapshot``: every name the broker exports.

Names follow Prometheus conventions (``streamd_`` prefix, base units, ``_total``
counters); labels are topic, partition and group (and go-grpc-prometheus' grpc_*
labels for RPCs), never offsets or ids. Consumer-group names mirror kafka_exporter's
``kafka_consumergroup_*`` with the ``streamd_`` prefix, so its dashboards adapt by a
rename (except ``kafka_consumergroup_lag_sum``: promtool rejects a gauge named
``_sum``; ``sum by (group, topic) (streamd_consumergroup_lag)`` is the same).

``StreamdCollector.collect`` runs on the HTTP server's thread and gets its data from
the event loop (``snapshot`` explains why).
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

import streamd

from .instruments import Histogram
from .snapshot import Snapshot, Sources, take

log = logging.getLogger("streamd.metrics")

#: How long a scrape waits for the event loop to take the snapshot.
SNAPSHOT_TIMEOUT_S = 5.0

_PT = ["topic", "partition"]
_GTP = ["group", "topic", "partition"]


class StreamdCollector:
    """A prometheus_client collector for one broker (one per server: tests run several
    brokers in one process, each with its own registry)."""

    def __init__(self, sources: Sources, loop: asyncio.AbstractEventLoop, *,
                 timeout_s: float = SNAPSHOT_TIMEOUT_S) -> None:
        self.sources = sources
        self.loop = loop
        self.timeout_s = timeout_s

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("streamd_build_info", "streamd version; always 1.",
                                 labels=["version", "python_version"])
        info.add_metric([streamd.__version__, platform.python_version()], 1)
        yield info
        snap = self.snapshot()
        if snap is not None:
            yield from families(snap)

    def snapshot(self) -> Snapshot | None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # e.g. generate_latest() called from a coroutine: waiting would deadlock
            return take(self.sources)

        async def on_the_loop() -> Snapshot:
            return take(self.sources)

        try:
            future = asyncio.run_coroutine_threadsafe(on_the_loop(), self.loop)
        except RuntimeError as exc:  # the loop is closed: the broker has stopped
            log.warning("metrics scrape: %s", exc)
            return None
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            log.warning("metrics scrape: the event loop did not answer within %.1f s", self.timeout_s)
        except Exception:
            log.exception("metrics scrape failed")
        return None


def families(snap: Snapshot) -> Iterator[Metric]:
    yield from _traffic(snap)
    yield from _rpcs(snap)
    if snap.fsync is not None:
        h = HistogramMetricFamily("streamd_log_fsync_duration_seconds",
                                  "Time of each log fsync (group commit: one per batch of appends).")
        h.add_metric([], *_buckets(snap.fsync))
        yield h
    yield from _storage(snap)
    yield from _groups(snap)
    yield from _queues(snap)


def _buckets(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    out: list[tuple[str, float]] = []
    total = 0.0
    for bound, n in zip([*map(str, h.bounds), "+Inf"], h.counts, strict=False):
        total += n
        out.append((bound, total))
    return out, h.sum


def _family(kind, name: str, doc: str, labels: list[str], rows) -> Metric:
    f = kind(name, doc, labels=labels)
    for values, v in rows:
        f.add_metric([str(x) for x in values], v)
    return f


def _traffic(snap: Snapshot) -> Iterator[Metric]:
    t = snap.topics
    c = CounterMetricFamily
    yield _family(c, "streamd_produced_records_total", "Records appended, per topic.", ["topic"],
                  (([r.topic], r.records_produced) for r in t))
    yield _family(c, "streamd_produced_bytes_total", "Batch bytes received by Produce and ProduceStream.",
                  ["topic"], (([r.topic], r.bytes_produced) for r in t))
    yield _family(c, "streamd_fetched_records_total", "Records served by Fetch and Subscribe.", ["topic"],
                  (([r.topic], r.records_fetched) for r in t))
    yield _family(c, "streamd_fetched_bytes_total", "Stored batch bytes served by Fetch and Subscribe.",
                  ["topic"], (([r.topic], r.bytes_fetched) for r in t))
    yield _family(GaugeMetricFamily, "streamd_active_subscribers", "Subscribe streams open.", ["topic"],
                  (([r.topic], r.subscribers) for r in t))


def _rpcs(snap: Snapshot) -> Iterator[Metric]:
    labels = ["grpc_type", "grpc_service", "grpc_method"]
    started = CounterMetricFamily("grpc_server_started_total", "Total number of RPCs started on the server.",
                                  labels=labels)
    handled = CounterMetricFamily("grpc_server_handled_total",
                                  "Total number of RPCs completed on the server, regardless of success or failure.",
                                  labels=labels + ["grpc_code"])
    seconds = HistogramMetricFamily("grpc_server_handling_seconds",
                                    "Histogram of response latency (seconds) of gRPC that had been application-level "
                                    "handled by the server.", labels=labels)
    for r in sorted(snap.rpcs, key=lambda r: (r.service, r.method)):
        key = [r.type, r.service, r.method]
        started.add_metric(key, r.started)
        for code, n in sorted(r.handled.items()):
            handled.add_metric(key + [code], n)
        seconds.add_metric(key, *_buckets(r.seconds))
    yield started
    yield handled
    yield seconds


def _storage(snap: Snapshot) -> Iterator[Metric]:
    ps = snap.partitions
    g, c = GaugeMetricFamily, CounterMetricFamily
    partitions: dict[str, int] = {}
    for p in ps:
        partitions[p.topic] = partitions.get(p.topic, 0) + 1
    yield _family(g, "streamd_topic_partitions", "Partitions of the topic.", ["topic"],
                  (([t], n) for t, n in sorted(partitions.items())))
    rows = [
        ("streamd_log_start_offset", "First offset still in the log.", "log_start_offset", g),
        ("streamd_log_end_offset", "The offset the next appended record gets.", "log_end_offset", g),
        ("streamd_log_high_watermark",
         "End of what readers see (below the log end only while fsync=always appends await their fsync).",
         "high_watermark", g),
        ("streamd_log_segments", "Segment files of the partition.", "segments", g),
        ("streamd_log_size_bytes", "Bytes of stored batches on disk.", "size_bytes", g),
        ("streamd_log_retention_deleted_segments_total", "Segments deleted by retention.",
         "retention_deleted_segments", c),
        ("streamd_log_retention_deleted_bytes_total", "Bytes deleted by retention.", "retention_deleted_bytes", c),
        ("streamd_log_recovery_truncated_bytes",
         "Bytes of torn or corrupt tail cut by crash recovery when this broker opened the partition.",
         "recovery_truncated_bytes", g),
        ("streamd_log_damaged_offsets",
         "Offsets found unreadable (corrupt batches, segment files cut short) since the broker opened the "
         "partition; reads of them answer DATA_LOSS.", "damaged_offsets", g),
        ("streamd_log_disk_full_refusals_total",
         "Produce requests refused (DISK_FULL) because the filesystem had no room.", "disk_full_refusals", c),
        ("streamd_log_disk_full",
         "1 while the partition's last append was refused for lack of space, else 0.", "disk_full", g),
    ]
    for name, doc, attr, kind in rows:
        yield _family(kind, name, doc, _PT, (([p.topic, p.partition], getattr(p, attr)) for p in ps))


def _groups(snap: Snapshot) -> Iterator[Metric]:
    g, c = GaugeMetricFamily, CounterMetricFamily
    yield _family(g, "streamd_consumergroup_members", "Members of the consumer group.", ["group"],
                  (([r.group], r.members) for r in snap.groups))
    yield _family(c, "streamd_consumergroup_rebalances_total",
                  "Rebalances (new partition assignments) of the group since the broker started.", ["group"],
                  (([r.group], r.rebalances) for r in snap.groups))
    gp = snap.group_partitions
    yield _family(g, "streamd_consumergroup_current_offset", "Committed offset of the group (partitions it "
                  "has committed).", _GTP,
                  (([r.group, r.topic, r.partition], r.committed_offset) for r in gp if r.committed_offset >= 0))
    yield _family(g, "streamd_consumergroup_lag",
                  "Records from the committed offset (or the log start) to the high watermark.", _GTP,
                  (([r.group, r.topic, r.partition], r.lag) for r in gp))
    yield _family(g, "streamd_consumergroup_lag_seconds", "Age of the oldest record the group has not committed "
                  "past (0 without lag).", _GTP, (([r.group, r.topic, r.partition], r.lag_seconds) for r in gp))


def _queues(snap: Snapshot) -> Iterator[Metric]:
    g, c = GaugeMetricFamily, CounterMetricFamily
    rows = [
        ("streamd_queue_backlog", "Records not yet delivered (or available for redelivery).", "backlog", g),
        ("streamd_queue_in_flight", "Records leased to a consumer now.", "in_flight", g),
        ("streamd_queue_waiting",
         "Records waiting: for a retry's backoff, a delivery time, a key's turn or the dead-letter topic.",
         "waiting", g),
        ("streamd_queue_acked_total", "Records acknowledged.", "acked", c),
        ("streamd_queue_redelivered_total", "Deliveries after the first.", "redelivered", c),
        ("streamd_queue_dead_lettered_total", "Records moved to the dead-letter topic.", "dead_lettered", c),
        ("streamd_queue_lease_expired_total", "Leases that ran out before the record was settled (since start-up).",
         "lease_expired", c),
        ("streamd_queue_lost_to_retention_total", "Records retention deleted before the group settled them.",
         "lost_to_retention", c),
        ("streamd_queue_lost_to_corruption_total",
         "Records a damaged log made unreadable before the group settled them (skipped).", "lost_to_corruption", c),
        ("streamd_queue_oldest_unacked_age_seconds", "Age of the oldest record not yet settled.",
         "oldest_unacked_seconds", g),
    ]
    for name, doc, attr, kind in rows:
        yield _family(kind, name, doc, _GTP, (([q.group, q.topic, q.partition], getattr(q, attr))
                                              for q in snap.queues))
