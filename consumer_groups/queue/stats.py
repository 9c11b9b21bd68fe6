"""What a queue group's partition looks like from outside: one plain, frozen row per
partition (``PartitionStats``), the public snapshot that DescribeQueueGroup encodes
and the metrics scrape reads. Made from a window (``window.PartitionQueue``) and the
partition's high watermark; no I/O here.

- ``backlog``: records not yet delivered (above the window, up to the high
  watermark) plus those available for (re)delivery in the window;
- ``in_flight``: leased now; ``waiting``: for a retry's backoff, a delivery time, a
  key's turn or the dead-letter topic;
- the counters (acked, redelivered, dead-lettered, lost) since the group began, but
  ``lease_expired``, since start-up;
- ``oldest_unacked_ms``: age of the oldest record not yet settled (0: none).
"""

from __future__ import annotations

from dataclasses import dataclass

from .window import PartitionQueue


@dataclass(frozen=True, slots=True)
class PartitionStats:
    partition: int
    start_offset: int
    log_end_offset: int  # the partition's high watermark (0: the topic is gone)
    backlog: int
    in_flight: int
    waiting: int
    acked: int
    redelivered: int
    dead_lettered: int
    lease_expired: int
    lost_to_retention: int
    lost_to_corruption: int
    oldest_unacked_ms: int


def partition_stats(q: PartitionQueue, end: int, now: int, oldest_ms: int | None) -> PartitionStats:
    """``q``'s row, for a partition whose high watermark is ``end`` and whose oldest
    unsettled record was appended at ``oldest_ms`` (None: there is none)."""
    counts = q.counts()
    s = q.stats
    return PartitionStats(
        partition=q.partition, start_offset=q.start_offset, log_end_offset=end,
        backlog=max(0, end - q.scan_offset) + counts["available"], in_flight=counts["leased"],
        waiting=counts["waiting"] + counts["blocked"] + counts["dead-lettering"],
        acked=s.acked, redelivered=s.redelivered, dead_lettered=s.dead_lettered, lease_expired=s.lease_expired,
        lost_to_retention=s.lost_to_retention, lost_to_corruption=s.lost_to_corruption,
        oldest_unacked_ms=max(0, now - oldest_ms) if oldest_ms is not None else 0,
    )
