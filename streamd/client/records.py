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


@dataclass(frozen=True, slots=True)
class ConsumerRecord:
    topic: str
    partition: int
    offset: int
    #: The producer's timestamp, or the broker's append time when the producer set none.
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where a produced record landed."""

    topic: str
    partition: int
    offset: int
    append_time_ms: int
    durable: bool


COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "lz4": pb.COMPRESSION_LZ4}


def add_record(
    record_set: pb.RecordSet,
    value: bytes,
    key: bytes | None = None,
    headers: Headers | None = None,
    timestamp_ms: int = 0,
) -> None:
    record = record_set.records.add(value=value, timestamp_ms=timestamp_ms)
    if key is not None:
        record.key = key
    if headers:
        record.headers.extend(pb.RecordHeader(key=k, value=v) for k, v in headers)


def encode_batch(record_set: pb.RecordSet, compression: str = "none") -> pb.RecordBatch:
    payload = record_set.SerializeToString()
    if compression == "lz4":
        return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload))
    return pb.RecordBatch(compression=COMPRESSIONS[compression], records=payload)


def values_batch(values: Iterable[bytes], compression: str = "none") -> pb.RecordBatch:
    """A batch of keyless records with the given values (the bulk fast path)."""
    record_set = pb.RecordSet()
    add = record_set.records.add
    for value in values:
        add(value=value)
    return encode_batch(record_set, compression)


def batch_records(batch: pb.RecordBatch) -> pb.RecordSet:
    payload = batch.records
    if batch.compression == pb.COMPRESSION_LZ4:
        payload = lz4.frame.decompress(payload)
    return pb.RecordSet.FromString(payload)


def decode_batches(
    batches: Iterable[pb.RecordBatch], topic: str, partition: int, min_offset: int = 0
) -> Iterator[ConsumerRecord]:
    """Records of stored batches, skipping offsets below ``min_offset``."""
    for batch in batches:
        base = batch.base_offset
        append_time = batch.append_time_ms
        skip = min_offset - base
        for i, r in enumerate(batch_records(batch).records):
            if i < skip:
                continue
            yield ConsumerRecord(
                topic,
                partition,
                base + i,
                r.timestamp_ms or append_time,
                r.key if r.HasField("key") else None,
                r.value,
                tuple((h.key, h.value) for h in r.headers) if r.headers else (),
            )
