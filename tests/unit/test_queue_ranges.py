"""The SDK packs acks and lease extensions into SettleRanges: consecutive offsets of
one lease (and, for extensions, one lease length) per range, nothing merged across
partitions, leases or gaps."""

from __future__ import annotations

from streamd.client.queue import Message, ack_ranges, extend_ranges
from streamd.v1 import streamd_pb2 as pb


def spans(ranges) -> list[tuple]:
    return [(r.partition, r.lease_id, r.first_offset, r.last_offset) for r in ranges]


def test_acks_become_ranges_of_one_lease_and_partition():
    acks = [(0, 5, 7), (0, 3, 7), (0, 4, 7), (0, 6, 8), (1, 5, 7), (0, 9, 7), (0, 4, 7)]
    ranges = ack_ranges(acks)
    assert spans(ranges) == [(0, 7, 3, 5), (0, 7, 9, 9), (0, 8, 6, 6), (1, 7, 5, 5)]
    assert {r.action for r in ranges} == {pb.SETTLE_ACTION_ACK}
    assert ack_ranges([]) == []


def message(partition: int, offset: int, lease_id: int, lease_s: float) -> Message:
    return Message("t", partition, offset, pb.Record(), 0, 1, lease_id, 0, None, 0.0, lease_s)


def test_extensions_group_by_lease_and_length_and_keep_their_messages():
    msgs = [message(0, 1, 7, 30), message(0, 2, 7, 30), message(0, 3, 7, 5), message(0, 4, 7, 30)]
    pairs = extend_ranges(msgs)
    got = sorted((r.delay_ms, r.first_offset, r.last_offset, [m.offset for m in ms]) for r, ms in pairs)
    assert got == [(5000, 3, 3, [3]), (30000, 1, 2, [1, 2]), (30000, 4, 4, [4])]
    assert {r.action for r, _ in pairs} == {pb.SETTLE_ACTION_EXTEND}
