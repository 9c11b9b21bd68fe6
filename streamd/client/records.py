"""Records as the SDK hands them out, and batch encoding/decoding.

Encoding builds one RecordSet per batch (records added in C by upb); decoding walks a
FetchResponse's batches, decompressing lz4 where the batch says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import lz4.frame

from streamd.v1 import streamd_pb2 as pb

Headers = Sequence[tuple[str, bytes]]


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

    def _fields(self) -> tuple:
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


COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "lz4": pb.COMPRESSION_LZ4}


def add_record(
    record_set: pb.RecordSet,
    value: bytes,
    key: bytes | None = None,
    headers: Headers | None = None,
    timestamp_ms: int = 0,
    idempotency_key: str | None = None,
) -> None:
    record = record_set.records.add(value=value, timestamp_ms=timestamp_ms)
    if key is not None:
        record.key = key
    if headers:
        record.headers.extend(pb.RecordHeader(key=k, value=v) for k, v in headers)
    if idempotency_key:
        record.idempotency_key = idempotency_key


def encode_batch(record_set: pb.RecordSet, compression: str = "none") -> pb.RecordBatch:
    payload = record_set.SerializeToString()
    if compression == "lz4":
        return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload))
    return pb.RecordBatch(compression=COMPRESSIONS[compression], records=payload)


def values_record_set(values: Iterable[bytes]) -> pb.RecordSet:
    """A RecordSet of keyless records with the given values."""
    record_set = pb.RecordSet()
    add = record_set.records.add
    for value in values:
        add(value=value)
    return record_set


def values_batch(values: Iterable[bytes], compression: str = "none") -> pb.RecordBatch:
    """A batch of keyless records with the given values (the bulk fast path)."""
    return encode_batch(values_record_set(values), compression)


def batch_records(batch: pb.RecordBatch) -> pb.RecordSet:
    payload = batch.records
    if batch.compression == pb.COMPRESSION_LZ4:
        payload = lz4.frame.decompress(payload)
    return pb.RecordSet.FromString(payload)


def iter_batch(batch: pb.RecordBatch, topic: str, partition: int, min_offset: int = 0) -> Iterator[ConsumerRecord]:
    """One stored batch's records, made one at a time: each record object can die as
    soon as the reader is done with it, before any GC pass sees it."""
    base = batch.base_offset
    append_time = batch.append_time_ms
    records = batch_records(batch).records
    skip = min_offset - base
    if skip > 0:
        records = records[skip:]
        base += skip
    for i, r in enumerate(records, base):
        yield ConsumerRecord(topic, partition, i, r, append_time)


def decode_batches(
    batches: Iterable[pb.RecordBatch], topic: str, partition: int, min_offset: int = 0
) -> list[ConsumerRecord]:
    """Records of stored batches as a list, skipping offsets below ``min_offset``."""
    return [r for batch in batches for r in iter_batch(batch, topic, partition, min_offset)]
