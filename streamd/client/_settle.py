"""Settlements in bulk: the SettleRanges a receiver sends for its acks, its lease
extensions and the records it hands back, and what their answers are logged as.

A range covers consecutive offsets of one partition and one lease (the broker settles
a range of offsets leased together in one step); a batch of acks is usually a handful
of ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from streamd.v1 import streamd_pb2 as pb

from .errors import StreamdError

if TYPE_CHECKING:
    from ._message import Message

log = logging.getLogger("streamd.client.queue")

P = TypeVar("P")
Place = tuple[int, int, int]  # (partition, offset, lease_id)


def ack_ranges(acks: list[tuple[int, int, int]]) -> list[pb.SettleRange]:
    """(partition, offset, lease_id) acks as SettleRanges: consecutive offsets of one
    lease make one range (a batch of acks is usually a handful of ranges)."""
    return [r for r, _ in _ranges([(a, a) for a in set(acks)], pb.SETTLE_ACTION_ACK)]


def extend_ranges(messages: list[Message]) -> list[tuple[pb.SettleRange, list[Message]]]:
    """Lease extensions for ``messages`` (each by its own lease length) as
    SettleRanges, each with the messages it covers."""
    keyed = [((m.partition, m.offset, m.lease_id), m) for m in messages]
    by_length: dict[int, list[tuple[Place, Message]]] = {}
    for item in keyed:
        by_length.setdefault(int(item[1].lease_s * 1000), []).append(item)
    return [pair for ms, items in by_length.items() for pair in _ranges(items, pb.SETTLE_ACTION_EXTEND, ms)]


def _ranges(items: Sequence[tuple[Place, P]], action: pb.SettleAction,
            delay_ms: int | None = None) -> list[tuple[pb.SettleRange, list[P]]]:
    """((partition, offset, lease_id), payload) items as ranges of consecutive offsets
    of one lease, each with the payloads it covers."""
    out: list[tuple[pb.SettleRange, list[P]]] = []
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


def log_release(group: str, topic: str, count: int, results: Sequence[pb.SettleResult] | StreamdError) -> None:
    """Log the records of a release (``release_ranges``) that were not handed back:
    they come again when their leases end."""
    if isinstance(results, StreamdError):
        log.info("queue %s/%s: %d record(s) not handed back: %s", group, topic, count, results)
        return
    refused = sum(r.refused or (1 if r.HasField("error") else 0) for r in results)
    if refused:
        log.info("queue %s/%s: %d record(s) not handed back (leases ended)", group, topic, refused)


#: The most offset runs a warning names (the rest are counted).
NAMED_RUNS = 50


def log_unhandled(group: str, topic: str, messages: list[Message], why: str) -> None:
    """A WARNING naming the at-most-once records (lease id 0) of ``messages`` that no
    handler finished: the broker acked them when it handed them out, so they will not
    come again and this line is all that is left of them."""
    lost = [m for m in messages if not m.lease_id]
    if lost:
        log.warning("queue %s/%s: %d at-most-once record(s) %s; they will not come again: %s", group, topic,
                    len(lost), why, places_text(lost))


def places_text(messages: list[Message]) -> str:
    """``partition@first-last`` runs of consecutive offsets, e.g. ``0@5-9, 1@3``."""
    runs: list[list[int]] = []
    for p, o in sorted({(m.partition, m.offset) for m in messages}):
        if runs and runs[-1][0] == p and runs[-1][2] == o - 1:
            runs[-1][2] = o
        else:
            runs.append([p, o, o])
    text = ", ".join(f"{p}@{a}" if a == b else f"{p}@{a}-{b}" for p, a, b in runs[:NAMED_RUNS])
    return text if len(runs) <= NAMED_RUNS else f"{text} and {len(runs) - NAMED_RUNS} more run(s)"
