"""Checking a producer's RecordBatch before it is appended.

A batch is decoded once, in C (upb), to prove it is well formed and to count its
records; no Python code runs per record unless the batch is larger than the
topic's record limit (then record sizes are measured without decoding them) or the
topic has a dedup window (then each record's idempotency key is read). The bytes
stored are the producer's own, unless the producer set broker-owned fields (a
forwarded batch), the topic asks the broker to compress, or a dedup window dropped
records (``rebuild_without``). An idempotent producer's ``producer_id`` and
``base_sequence`` stay in the stored body (``producer_state`` rebuilds from them).
"""

from __future__ import annotations

from typing import NamedTuple

import lz4.frame
from google.protobuf.message import DecodeError

from streamd.v1 import streamd_pb2 as pb
from streamd.wire_pb2 import RawRecordSet

from .errors import InvalidBatch, RecordTooLarge

_BROKER_FIELDS = ("crc32", "base_offset", "append_time_ms", "record_count")
_PLAIN = (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE)


def decompress_lz4(data: bytes, *, max_bytes: int) -> bytes:
    """Decompress an lz4 frame, refusing output past ``max_bytes`` (no bombs)."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        out = decompressor.decompress(data, max_length=max_bytes + 1)
    except RuntimeError as exc:
        raise InvalidBatch(f"records are not a valid lz4 frame: {exc}") from None
    if len(out) > max_bytes:
        raise RecordTooLarge("uncompressed batch", len(out), max_bytes)
    if not decompressor.eof:
        raise InvalidBatch("records hold a truncated lz4 frame")
    return out


class CheckedBatch(NamedTuple):
    """A producer batch that passed ``checked_batch``: what to store and what the
    append-time checks (idempotence, dedup window) need to know about it."""

    body: bytes  # what ``segments.batch.encode_frame`` stores after the header
    record_count: int
    producer_id: int = 0
    base_sequence: int = 0
    #: Sequence numbers the batch used when fewer records are stored than the
    #: producer sent (0: ``record_count``).
    sequence_count: int = 0
    #: Dedup topics only, when a record has an idempotency key: the key of every
    #: record ("" for none), the serialized records and the stored compression, so
    #: the batch can be rebuilt without the duplicates.
    keys: list[str] | None = None
    records: list[bytes] | None = None
    compression: pb.Compression = pb.COMPRESSION_NONE


def check_batch(
    raw: bytes,
    *,
    max_batch_bytes: int,
    max_record_bytes: int,
    compress: bool = False,
) -> tuple[bytes, int]:
    """Return ``(body, record_count)`` for a producer batch, or raise.

    ``body`` is what ``segments.batch.encode_frame`` stores after the header.
    """
    checked = checked_batch(raw, max_batch_bytes=max_batch_bytes, max_record_bytes=max_record_bytes,
                            compress=compress)
    return checked.body, checked.record_count


def checked_batch(
    raw: bytes,
    *,
    max_batch_bytes: int,
    max_record_bytes: int,
    compress: bool = False,
    with_keys: bool = False,
) -> CheckedBatch:
    """Check a producer batch (see ``check_batch``); ``with_keys`` (topics with a
    dedup window) also collects the records' idempotency keys."""
    if len(raw) > max_batch_bytes:
        raise RecordTooLarge("batch", len(raw), max_batch_bytes)
    try:
        batch = pb.RecordBatch.FromString(raw)
    except DecodeError:
        raise InvalidBatch("not a serialized RecordBatch") from None
    for name in _BROKER_FIELDS:
        batch.ClearField(name)
    if batch.ByteSize() != len(raw):
        # The producer sent broker-owned fields (a forwarded batch, or zeros written
        # explicitly): stored after the broker's header they would override it.
        raw = batch.SerializeToString()
    compression = batch.compression
    if compression == pb.COMPRESSION_LZ4:
        payload = decompress_lz4(batch.records, max_bytes=max_batch_bytes)
    elif compression in _PLAIN:
        payload = batch.records
    else:
        raise InvalidBatch(f"unknown compression {compression}")
    try:
        records = pb.RecordSet.FromString(payload).records
    except DecodeError:
        raise InvalidBatch("records are not a serialized RecordSet") from None
    count = len(records)
    if count == 0:
        raise InvalidBatch("a batch needs at least one record")
    if len(payload) > max_record_bytes:
        largest = max(map(len, RawRecordSet.FromString(payload).records))
        if largest > max_record_bytes:
            raise RecordTooLarge("record", largest, max_record_bytes)
    if compress and compression in _PLAIN:
        raw = _lz4_body(payload, batch.producer_id, batch.base_sequence)
        compression = pb.COMPRESSION_LZ4
    if with_keys:
        keys = [r.idempotency_key for r in records]
        if any(keys):
            return CheckedBatch(raw, count, batch.producer_id, batch.base_sequence, 0, keys,
                                list(RawRecordSet.FromString(payload).records), compression)
    return CheckedBatch(raw, count, batch.producer_id, batch.base_sequence)


def rebuild_without(batch: CheckedBatch, keep: list[int]) -> CheckedBatch:
    """``batch`` with only the records at indexes ``keep`` (dropping the duplicates
    of a dedup window). An idempotent batch keeps its producer id; its stored base
    sequence is shifted so that it still ends where the original ends (see
    ``producer_state``), and the sequence numbers the original used are kept in
    ``base_sequence``/``sequence_count`` of the plan, not here."""
    assert batch.records is not None and batch.keys is not None
    kept = [batch.records[i] for i in keep]
    payload = RawRecordSet(records=kept).SerializeToString()
    stored_base = batch.base_sequence + batch.record_count - len(kept)
    if batch.compression == pb.COMPRESSION_LZ4:
        body = _lz4_body(payload, batch.producer_id, stored_base)
    else:
        body = pb.RecordBatch(compression=batch.compression, records=payload, producer_id=batch.producer_id,
                              base_sequence=stored_base if batch.producer_id else 0).SerializeToString()
    keys = [batch.keys[i] for i in keep]
    return batch._replace(body=body, record_count=len(kept), sequence_count=batch.sequence_count or batch.record_count,
                          keys=keys, records=kept)


def batch_from_records(
    records: list[bytes], *, compress: bool = False, keys: list[str] | None = None
) -> CheckedBatch:
    """A checked batch of already-checked serialized ``Record`` messages (broker-side
    routing): no second parse. ``keys``: their idempotency keys (dedup topics)."""
    payload = RawRecordSet(records=records).SerializeToString()
    if compress:
        body, compression = _lz4_body(payload), pb.COMPRESSION_LZ4
    else:
        compression = pb.COMPRESSION_NONE
        body = pb.RecordBatch(compression=compression, records=payload).SerializeToString()
    if keys is not None and any(keys):
        return CheckedBatch(body, len(records), keys=keys, records=records, compression=compression)
    return CheckedBatch(body, len(records))


def _lz4_body(payload: bytes, producer_id: int = 0, base_sequence: int = 0) -> bytes:
    batch = pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload))
    if producer_id:
        batch.producer_id, batch.base_sequence = producer_id, base_sequence
    return batch.SerializeToString()
