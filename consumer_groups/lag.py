"""Stream groups seen against the log: which topics a group covers and how far its
committed offsets trail the high watermark (lag in records and in time).

``GroupView`` is the public read side of stream groups, over the ``Coordinator``
(members), the ``OffsetStore`` (committed offsets) and the broker's face
(``consumer_groups.host.Broker``: partitions' offsets, one frame header read per
lagging partition for the age of its first record). DescribeGroup encodes its rows;
the metrics scrape reads ``summaries``. Plain rows out, no I/O beyond that read.

Lag of a partition: from the committed offset (or the log start, with nothing
committed or an offset retention has passed) to the high watermark; ``lag_ms`` is
the age of the first of those records (0 without lag or when it cannot be read:
the lag in records is still right).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from segments import CorruptRecords

from .coordinator import Coordinator
from .host import Broker
from .offsets import CommittedOffset, OffsetStore

log = logging.getLogger("streamd.groups")


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed_offset: int  # -1: nothing committed
    log_start_offset: int
    log_end_offset: int  # the high watermark
    lag: int
    lag_ms: int
    metadata: str


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One group as the metrics scrape reports it."""

    group: str
    members: int
    rebalances: int
    partitions: list[PartitionLag]


class GroupView:
    def __init__(self, broker: Broker, coordinator: Coordinator, store: OffsetStore) -> None:
        self.broker = broker
        self.coordinator = coordinator
        self.store = store

    def names(self) -> list[str]:
        """Every group with committed offsets or members, sorted."""
        return sorted(set(self.store.groups()) | set(self.coordinator.groups))

    def topics(self, group: str) -> set[str]:
        """Topics the group has offsets in or members subscribed to (that exist)."""
        g = self.coordinator.groups.get(group)
        topics = {t for t, _ in self.store.offsets(group)}
        if g is not None:
            topics |= g.topics()
        return {t for t in topics if t in self.broker.topics}

    def partition_lag(self, topic: str, p: int, committed: CommittedOffset | None, now: int) -> PartitionLag:
        """Lag of a group at ``committed`` (None: nothing committed) on one partition:
        records to the high watermark and the age of the first of them."""
        part = self.broker.partition(topic, p)
        start, end = part.log_start_offset, part.high_watermark
        position = max(committed.offset, start) if committed is not None else start
        lag = max(0, end - position)
        lag_ms = 0
        if lag:
            try:
                first = part.append_time_at(position)
            except CorruptRecords:  # the log reported it; lag in records is still right
                pass
            except Exception as exc:  # lag in records is still worth showing
                log.warning("lag time of %s/%d: %s", topic, p, exc)
            else:
                lag_ms = max(0, now - first) if first is not None else 0
        return PartitionLag(
            topic=topic, partition=p, committed_offset=committed.offset if committed is not None else -1,
            log_start_offset=start, log_end_offset=end, lag=lag, lag_ms=lag_ms,
            metadata=committed.metadata if committed is not None else "",
        )

    def group_lag(self, group: str, now: int) -> list[PartitionLag]:
        """Lag of every partition of every topic the group covers, by topic and partition."""
        committed = self.store.offsets(group)
        return [
            self.partition_lag(topic, p, committed.get((topic, p)), now)
            for topic in sorted(self.topics(group))
            for p in range(len(self.broker.topics[topic].partitions))
        ]

    def summaries(self, now: int) -> list[GroupSummary]:
        c = self.coordinator
        return [GroupSummary(name, c.live_members(name), c.rebalances.get(name, 0), self.group_lag(name, now))
                for name in self.names()]
