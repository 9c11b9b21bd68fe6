"""Admission: records of the log enter a partition's window.

A batch none of whose records has a delivery time (``delay_ms``, ``deliver_at_ms``) is
admitted whole, as one run, without decoding its records: a ``DeliveryTimesSet`` view
of the batch (every other field dropped) tells, in C, from its size alone. Otherwise,
and for ``ordered_by_key`` groups, the records are decoded and admitted one by one,
with their key and delivery time.
"""

from __future__ import annotations

import lz4.frame

from streamd.codec import batch_records
from streamd.v1 import streamd_pb2 as pb
from streamd.wire_pb2 import DeliveryTimesSet

from .window import PartitionQueue


def admit_batch(q: PartitionQueue, batch: pb.RecordBatch, end: int) -> bool:
    """Admit the batch's records from ``q.scan_offset`` (below ``end``, while the
    window has room); whether the whole batch was taken (go on with the next)."""
    base, count, append_time = batch.base_offset, batch.record_count, batch.append_time_ms
    stop = min(base + count, end)
    first = q.scan_offset
    if first >= stop:
        return stop == base + count
    room = q.room()
    if room <= 0:
        return False
    if q.plain() and not has_delivery_times(batch):
        take = min(stop - first, room)
        q.admit_run(first, take, append_time)
    else:
        records = batch_records(batch).records
        for offset in range(first, stop):
            if q.room() <= 0:
                return False
            r = records[offset - base]
            at = r.deliver_at_ms
            if r.delay_ms:
                at = max(at, append_time + r.delay_ms)
            q.admit(offset, key=r.key if r.HasField("key") else None, deliver_at_ms=at, append_time_ms=append_time)
    return q.scan_offset == base + count


def has_delivery_times(batch: pb.RecordBatch) -> bool:
    """Whether a record of the batch has a delivery time (delay or deliver-at), found
    in C: parsed as ``DeliveryTimesSet`` without its other fields, a batch of records
    without one is two bytes per record."""
    payload = batch.records
    if batch.compression == pb.COMPRESSION_LZ4:
        payload = lz4.frame.decompress(payload)
    view = DeliveryTimesSet.FromString(payload)
    view.DiscardUnknownFields()
    return view.ByteSize() != 2 * len(view.records)
