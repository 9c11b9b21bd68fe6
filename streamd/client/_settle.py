"""Settlements in bulk: the SettleRanges a receiver sends for its acks, its lease
extensions and the records it hands back, and what their answers are logged as.

A range covers consecutive offsets of one partition and one lease (the broker settles
a range of offsets leased together in one step); a batch of acks is usually a handful
of ranges.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from streamd.v1 import streamd_pb2 as pb

from .errors import StreamdError

if TYPE_CHECKING:
    from .queue import Message

log = logging.getLogger("streamd.client.queue")


def ack_ranges(acks: list[tuple[int, int, int]]) -> list[pb.SettleRange]:
    """(partition, offset, lease_id) acks as SettleRanges: consecutive offsets of one
    lease make one range (a batch of acks is usually a handful of ranges)."""
    return [r for r, _ in _ranges([(a, a) for a in set(acks)], pb.SETTLE_ACTION_ACK)]


def extend_ranges(messages: list[Message]) -> list[tuple[pb.SettleRange, list[Message]]]:
    """Lease extensions for ``messages`` (each by its own lease length) as
    SettleRanges, each with the messages it covers."""
    keyed = [((m.partition, m.offset, m.lease_id), m) for m in messages]
    by_length: dict[int, list] = {}
    for item in keyed:
        by_length.setdefault(int(item[1].lease_s * 1000), []).append(item)
    return [pair for ms, items in by_length.items() for pair in _ranges(items, pb.SETTLE_ACTION_EXTEND, ms)]


def _ranges(items: list[tuple[tuple[int, int, int], object]], action: int,
            delay_ms: int | None = None) -> list[tuple[pb.SettleRange, list]]:
    """((partition, offset, lease_id), payload) items as ranges of consecutive offsets
    of one lease, each with the payloads it covers."""
    out: list[tuple[pb.SettleRange, list]] = []
    last = None
    for (p, offset, lease_id), payload in sorted(items, key=lambda i: (i[0][0], i[0][2], i[0][1])):
        if last is not None and (last.partition, last.lease_id) == (p, lease_id) and last.last_offset == offset - 1:
            last.last_offset = offset
            out[-1][1].append(payload)
            continue
        last = pb.SettleRange(partition=p, first_offset=offset, last_offset=offset, lease_id=lease_id,
                              action=action, delay_ms=delay_ms)
        out.append((last, [payload]))
    return out


def release_ranges(messages: list[Message], reason: str) -> list[pb.SettleRange]:
    """Nacks with no delay for ``messages`` (received, not started: another worker may
    have them at once) as SettleRanges. At-most-once records (lease id 0) have none."""
    items = [((m.partition, m.offset, m.lease_id), m) for m in messages if m.lease_id]
    ranges = [r for r, _ in _ranges(items, pb.SETTLE_ACTION_NACK, 0)]
    for r in ranges:
        r.reason = reason
    return ranges


def log_release(group: str, topic: str, count: int, results: list | StreamdError) -> None:
    """Log the records of a release (``release_ranges``) that were not handed back:
    they come again when their leases end."""
    if isinstance(results, StreamdError):
        log.info("queue %s/%s: %d record(s) not handed back: %s", group, topic, count, results)
        return
    refused = sum(r.refused or (1 if r.HasField("error") else 0) for r in results)
    if refused:
        log.info("queue %s/%s: %d record(s) not handed back (leases ended)", group, topic, refused)
