"""Checking a producer's RecordBatch before it is appended.

A batch is decoded once, in C (upb), to prove it is well formed and to count its
records; no Python code runs per record unless the batch is larger than the
topic's record limit (then record sizes are measured without decoding them). The
bytes stored are the producer's own, unless the producer set broker-owned fields
(a forwarded batch) or the topic asks the broker to compress.
"""

from __future__ import annotations

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
        count = len(pb.RecordSet.FromString(payload).records)
    except DecodeError:
        raise InvalidBatch("records are not a serialized RecordSet") from None
    if count == 0:
        raise InvalidBatch("a batch needs at least one record")
    if len(payload) > max_record_bytes:
        largest = max(map(len, RawRecordSet.FromString(payload).records))
        if largest > max_record_bytes:
            raise RecordTooLarge("record", largest, max_record_bytes)
    if compress and compression in _PLAIN:
        raw = _lz4_body(payload)
    return raw, count


def batch_from_records(records: list[bytes], *, compress: bool = False) -> tuple[bytes, int]:
    """``(body, record_count)`` for already-checked serialized ``Record`` messages
    (broker-side routing): no second parse."""
    payload = RawRecordSet(records=records).SerializeToString()
    if compress:
        return _lz4_body(payload), len(records)
    return pb.RecordBatch(compression=pb.COMPRESSION_NONE, records=payload).SerializeToString(), len(records)


def _lz4_body(payload: bytes) -> bytes:
    return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload)).SerializeToString()
