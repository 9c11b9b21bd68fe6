"""Records as the SDK hands them out: ``ConsumerRecord`` (a light view of a decoded
record), ``RecordMetadata`` (where a produced one landed), and reading a stored
batch's records as ``ConsumerRecord`` objects (``iter_batch``, ``decode_batches``).

Batch encoding and offset cutting are ``streamd.codec``'s (shared with the broker);
their names are re-exported here, where the SDK always had them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from streamd.codec import (
    COMPRESSIONS,
    MAX_OFFSET,
    Headers,
    add_record,
    batch_records,
    batch_window,
    encode_batch,
    record_runs,
    values_batch,
    values_record_set,
)
from streamd.v1 import streamd_pb2 as pb

__all__ = [
    "COMPRESSIONS",
    "MAX_OFFSET",
    "ConsumerRecord",
    "Headers",
    "RecordFields",
    "RecordMetadata",
    "add_record",
    "batch_records",
    "batch_window",
    "decode_batches",
    "encode_batch",
    "iter_batch",
    "record_runs",
    "values_batch",
    "values_record_set",
]


class RecordFields:
    """Key, value, headers and timestamp read from a decoded protobuf record (``_record``,
    with its batch's ``_append_time_ms``) when asked for, so a large answer costs one
    small object per record. ``key`` is None for a record produced without a key;
    ``timestamp_ms`` is the producer's timestamp, or the broker's append time when the
    producer set none."""

    __slots__ = ()
    _record: pb.Record
    _append_time_ms: int

    @property
    def value(self) -> bytes:
        return self._record.value

    @property
    def key(self) -> bytes | None:
        r = self._record
        return r.key if r.HasField("key") else None

    @property
    def timestamp_ms(self) -> int:
        return self._record.timestamp_ms or self._append_time_ms

    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((h.key, h.value) for h in self._record.headers)


class ConsumerRecord(RecordFields):
    """One record as read: topic, partition, offset, timestamp_ms, key, value, headers
    (a light view: see ``RecordFields``)."""

    __slots__ = ("topic", "partition", "offset", "_record", "_append_time_ms")

    def __init__(self, topic: str, partition: int, offset: int, record: pb.Record, append_time_ms: int) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._record = record
        self._append_time_ms = append_time_ms

    def _fields(self) -> tuple[object, ...]:
        return (self.topic, self.partition, self.offset, self.timestamp_ms, self.key, self.value, self.headers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConsumerRecord) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"ConsumerRecord(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"timestamp_ms={self.timestamp_ms}, key={self.key!r}, value={self.value[:64]!r}, headers={self.headers!r})"
        )


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where a produced record landed. ``duplicate``: it was not appended by this
    send because it already was — a retried batch the broker had (idempotent
    producer), or a record whose idempotency key the topic's dedup window had seen;
    ``offset`` is then where the first one went."""

    topic: str
    partition: int
    offset: int
    append_time_ms: int
    durable: bool
    duplicate: bool = False


def iter_batch(batch: pb.RecordBatch, topic: str, partition: int, min_offset: int = 0) -> Iterator[ConsumerRecord]:
    """One stored batch's records at or after ``min_offset``, made one at a time: each
    record object can die as soon as the reader is done with it, before any GC pass
    sees it (so a whole batch is read from its container, not copied into a list)."""
    base = batch.base_offset
    append_time = batch.append_time_ms
    records = batch_records(batch).records
    lo, hi = batch_window(base, len(records), min_offset, MAX_OFFSET)
    for i, r in enumerate(records[lo:hi] if lo else records, base + lo):
        yield ConsumerRecord(topic, partition, i, r, append_time)


def decode_batches(
    batches: Iterable[pb.RecordBatch], topic: str, partition: int, min_offset: int = 0
) -> list[ConsumerRecord]:
    """Records of stored batches (a Fetch or Subscribe answer: ascending, as stored)
    as a list, skipping offsets below ``min_offset``."""
    return [r for batch in batches for r in iter_batch(batch, topic, partition, min_offset)]
