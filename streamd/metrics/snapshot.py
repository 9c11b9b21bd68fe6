"""A consistent copy of everything the scrape reports, taken on the event loop.

Thread-safety (the choice): the broker's state (topics, partition logs, groups,
queue windows, the plain counters of ``instruments``) belongs to the event loop and
changes without locks. The HTTP server answers scrapes on its own thread, so the
collector never reads that state itself: it asks the loop to run ``take`` (with
``asyncio.run_coroutine_threadsafe`` and a timeout) and works on the plain rows it
returns. ``take`` has no awaits, so the rows are one instant's state. Its cost falls
on the loop, once per scrape, and is proportional to partitions + groups (plus one
batch header read per lagging partition, for lag in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer_groups.lag import GroupView
from consumer_groups.queue.engine import QueueEngine
from streamd.broker.broker import Broker

from .instruments import Histogram, RpcStats, Traffic


@dataclass(frozen=True)
class TopicRow:
    topic: str
    records_produced: int
    bytes_produced: int
    records_fetched: int
    bytes_fetched: int
    subscribers: int


@dataclass(frozen=True)
class PartitionRow:
    topic: str
    partition: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    segments: int
    size_bytes: int
    retention_deleted_segments: int
    retention_deleted_bytes: int
    recovery_truncated_bytes: int
    damaged_offsets: int = 0
    disk_full_refusals: int = 0
    disk_full: int = 0


@dataclass(frozen=True)
class GroupPartitionRow:
    group: str
    topic: str
    partition: int
    committed_offset: int  # -1: nothing committed
    lag: int
    lag_seconds: float


@dataclass(frozen=True)
class GroupRow:
    group: str
    members: int
    rebalances: int


@dataclass(frozen=True)
class QueueRow:
    group: str
    topic: str
    partition: int
    backlog: int
    in_flight: int
    waiting: int
    acked: int
    redelivered: int
    dead_lettered: int
    lease_expired: int
    lost_to_retention: int
    oldest_unacked_seconds: float
    lost_to_corruption: int = 0


@dataclass(frozen=True)
class RpcRow:
    service: str
    method: str
    type: str
    started: int
    handled: dict[str, int]
    seconds: Histogram


@dataclass
class Snapshot:
    topics: list[TopicRow] = field(default_factory=list)
    partitions: list[PartitionRow] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    group_partitions: list[GroupPartitionRow] = field(default_factory=list)
    queues: list[QueueRow] = field(default_factory=list)
    rpcs: list[RpcRow] = field(default_factory=list)
    fsync: Histogram | None = None


@dataclass
class Sources:
    """What the snapshot reads; ``groups``/``queues`` are None until the server has
    opened them."""

    broker: Broker
    traffic: Traffic
    fsync: Histogram
    rpcs: dict[str, RpcStats] | None = None
    groups: GroupView | None = None
    queues: QueueEngine | None = None


def take(src: Sources) -> Snapshot:
    """Copy the state into rows. Run on the event loop (see the module docstring)."""
    snap = Snapshot(fsync=src.fsync.copy())
    broker = src.broker
    _traffic(src.traffic, broker.topics, snap)
    for topic in list(broker.topics.values()):
        for part in topic.partitions:
            if part.closed or not part.log_open:  # failed: the repair job reopens it
                continue
            stats = part.describe()
            report = part.recovery
            snap.partitions.append(PartitionRow(
                part.topic, part.index, stats.log_start_offset, stats.log_end_offset, part.high_watermark,
                stats.segment_count, stats.size_bytes, part.retention_deleted_segments,
                part.retention_deleted_bytes, report.bytes_truncated if report is not None else 0,
                sum(d.last_offset - d.first_offset + 1 for d in part.damaged()),
                part.disk_full_refusals, int(part.disk_full),
            ))
    for r in (src.rpcs or {}).values():
        snap.rpcs.append(RpcRow(r.service, r.method, r.type, r.started, dict(r.handled), r.seconds.copy()))
    if src.groups is not None:
        _groups(src.groups, snap)
    if src.queues is not None:
        _queues(src.queues, snap)
    return snap


def _traffic(traffic: Traffic, topics: dict, snap: Snapshot) -> None:
    for name in [n for n in traffic.topics if n not in topics]:
        del traffic.topics[name]  # a deleted topic's counters go with it
    for name, t in sorted(traffic.topics.items()):
        snap.topics.append(TopicRow(name, t.records_produced, t.bytes_produced, t.records_fetched,
                                    t.bytes_fetched, t.subscribers))


def _groups(view: GroupView, snap: Snapshot) -> None:
    for s in view.summaries(view.broker.clock.now_ms()):
        snap.groups.append(GroupRow(s.group, s.members, s.rebalances))
        for lag in s.partitions:
            snap.group_partitions.append(GroupPartitionRow(
                s.group, lag.topic, lag.partition, lag.committed_offset, lag.lag, lag.lag_ms / 1000))


def _queues(engine: QueueEngine, snap: Snapshot) -> None:
    now = engine.broker.clock.now_ms()
    for g in engine.groups():
        for s in engine.partition_stats(g, now):
            snap.queues.append(QueueRow(
                g.name, g.topic, s.partition, s.backlog, s.in_flight, s.waiting, s.acked, s.redelivered,
                s.dead_lettered, s.lease_expired, s.lost_to_retention, s.oldest_unacked_ms / 1000,
                s.lost_to_corruption,
            ))

