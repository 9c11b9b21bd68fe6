"""Read-only walks over a partition's stored batches, for rebuilding broker state
(idempotent producers, the dedup window) from the log when a partition opens.

Frames come from ``PartitionLog.read`` (the public read path, a few MiB at a time)
and are never decoded beyond what the caller asks: ``producer_fields`` picks the two
idempotence fields out of a stored body with a small protobuf tag walk, without
copying the records. A damaged range (``CorruptRecords``) is skipped: the state is
rebuilt from the batches that can be read (the log already reported the damage), so a
damaged segment never keeps a partition from opening.
"""

from __future__ import annotations

from collections.abc import Iterator

from segments import CorruptRecords, FrameHeader, PartitionLog, ReadLimits, iter_frames

SCAN_CHUNK_BYTES = 4 * 1024 * 1024
_SCAN = ReadLimits(max_records=1 << 31, max_bytes=SCAN_CHUNK_BYTES)
_INT64_SIGN = 1 << 63


def iter_batches(plog: PartitionLog, from_offset: int) -> Iterator[tuple[FrameHeader, memoryview]]:
    """(header, body) of every stored batch holding an offset at or after
    ``from_offset`` (clamped to the log start), oldest first. ``body`` is the
    producer's part of the frame (``FrameHeader.body_position`` on), valid until the
    next item. Runs while the partition opens, before there is a ``Partition``."""
    offset = max(from_offset, plog.log_start_offset)
    while offset < plog.log_end_offset:
        try:
            res = plog.read(offset, _SCAN)
        except CorruptRecords as exc:
            offset = exc.next_offset
            continue
        if not res.batch_count:
            return
        view = memoryview(res.data)
        try:
            for header in iter_frames(res.data):
                if header.next_offset > offset:
                    yield header, view[header.body_position : header.end]
        finally:
            view.release()
        offset = res.next_offset


def producer_fields(body) -> tuple[int, int]:
    """``(producer_id, base_sequence)`` of a stored batch body (zeros when absent).

    Walks the body's protobuf fields (any order), skipping the records without
    copying them. Raises ValueError on a body that is not well-formed protobuf.
    """
    try:
        return _producer_fields(body)
    except IndexError:
        raise ValueError("a field runs past the end of the batch") from None


def _producer_fields(body) -> tuple[int, int]:
    pos, end = 0, len(body)
    producer_id = base_sequence = 0
    while pos < end:
        tag, pos = _varint(body, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(body, pos)
            field = tag >> 3
            if field == 7:
                producer_id = value
            elif field == 8:
                base_sequence = value - (1 << 64) if value >= _INT64_SIGN else value
        elif wire == 2:
            length, pos = _varint(body, pos)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("a field runs past the end of the batch")
    return producer_id, base_sequence


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
