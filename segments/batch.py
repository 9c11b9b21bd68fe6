"""The stored record-batch frame: the unit of the log file, the index and fetch.

A segment's ``.log`` file is a sequence of frames. Each frame is, byte for byte, one
``batches`` entry (field 1, length-delimited) of ``streamd.v1.FetchResponse``, so a
fetch returns a slice of the file as it is and any protobuf library decodes it::

    offset size  bytes
    0      1     0x0a            tag: field 1 (batches), wire type 2
    1      5     varint(L)       L = frame size - 6, padded to 5 bytes (0x80.. 0x00)
    -- RecordBatch (L bytes) --
    6      1     0x0d            tag: field 1 (crc32), fixed32
    7      4     crc32           CRC-32 (IEEE, zlib) of bytes 11 .. end of frame
    11     1     0x11            tag: field 2 (base_offset), sfixed64
    12     8     base_offset
    20     1     0x19            tag: field 3 (append_time_ms), sfixed64
    21     8     append_time_ms
    29     1     0x25            tag: field 4 (record_count), fixed32
    30     4     record_count
    34     ..    body            the producer's fields (compression, records, ...)

All integers are little-endian, as protobuf's fixed-width types are. Protobuf
parsers accept over-long varints, so the padded length keeps every header field at
a fixed position and the header can be read with one ``struct.unpack_from``.
The body is opaque here: this module never decodes records.

A zero byte where a tag should be marks the end of the data in a preallocated file.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import mmap
    from typing import TypeAlias

    #: What frames are read from: a read's bytes, a segment file's map, a view of one.
    FrameBuffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

FRAME_TAG = 0x0A
HEADER = struct.Struct("<B5sBIBqBqBI")
HEADER_SIZE = HEADER.size  # 34
CRC_START = 11  # the CRC covers frame[CRC_START:]
_TAGS = (0x0D, 0x11, 0x19, 0x25)
MAX_FRAME_BYTES = (1 << 31) - 1  # positions in the offset index are uint32


class FrameHeader(NamedTuple):
    """The fixed header of one stored frame at a byte ``position`` of a file (or of
    the data a read returned). Public as ``segments.FrameHeader``."""

    position: int
    size: int  # whole frame, header included
    crc32: int
    base_offset: int
    append_time_ms: int
    record_count: int

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1

    @property
    def end(self) -> int:
        return self.position + self.size

    @property
    def body_position(self) -> int:
        """Where the producer's part of the frame (``body_of``) starts."""
        return self.position + HEADER_SIZE


def _varint5(value: int) -> bytes:
    return bytes(
        (
            (value & 0x7F) | 0x80,
            ((value >> 7) & 0x7F) | 0x80,
            ((value >> 14) & 0x7F) | 0x80,
            ((value >> 21) & 0x7F) | 0x80,
            (value >> 28) & 0x7F,
        )
    )


def _unvarint5(raw: bytes) -> int | None:
    b0, b1, b2, b3, b4 = raw
    if not (b0 & b1 & b2 & b3 & 0x80) or b4 & 0x80:
        return None
    return (b0 & 0x7F) | (b1 & 0x7F) << 7 | (b2 & 0x7F) << 14 | (b3 & 0x7F) << 21 | b4 << 28


def encode_frame(body: bytes, *, base_offset: int, append_time_ms: int, record_count: int) -> bytes:
    """Build the frame for a producer's batch ``body`` (serialized fields 5 and up)."""
    size = HEADER_SIZE + len(body)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME_BYTES}")
    tail = struct.pack("<BqBqBI", 0x11, base_offset, 0x19, append_time_ms, 0x25, record_count)
    crc = zlib.crc32(body, zlib.crc32(tail))
    return b"".join((bytes((FRAME_TAG,)), _varint5(size - 6), struct.pack("<BI", 0x0D, crc), tail, body))


def read_header(buf: FrameBuffer, position: int, limit: int) -> FrameHeader | None:
    """The header of the frame at ``position``, or None where no well-formed frame
    header fits before ``limit`` (end of data, zero fill, or garbage).

    ``buf`` is anything ``struct.unpack_from`` reads: bytes, mmap, numpy buffer.
    """
    if position + HEADER_SIZE > limit:
        return None
    tag, raw_len, t1, crc, t2, base, t3, append, t4, count = HEADER.unpack_from(buf, position)
    if tag != FRAME_TAG or (t1, t2, t3, t4) != _TAGS:
        return None
    length = _unvarint5(raw_len)
    if length is None or length < HEADER_SIZE - 6 or position + 6 + length > limit:
        return None
    if count < 1 or base < 0:
        return None
    return FrameHeader(position, length + 6, crc, base, append, count)


def claimed_frame_size(buf: FrameBuffer, position: int, limit: int) -> int | None:
    """The size the frame at ``position`` claims by its tag and length prefix (6
    bytes, the rest unchecked), or None if no frame starts there or fewer than 6
    bytes are left before ``limit``: how much to read to check the frame whole."""
    if position + 6 > limit or buf[position] != FRAME_TAG:
        return None
    length = _unvarint5(bytes(buf[position + 1 : position + 6]))
    return None if length is None else length + 6


def iter_headers(buf: FrameBuffer, position: int = 0, limit: int | None = None) -> Iterator[FrameHeader]:
    """Headers of consecutive well-formed frames from ``position``; stops at the first
    position that does not hold one (end of data, zero fill or garbage)."""
    limit = len(buf) if limit is None else limit
    while position < limit:
        header = read_header(buf, position, limit)
        if header is None:
            return
        yield header
        position = header.end


def iter_frames(data: bytes | memoryview) -> Iterator[FrameHeader]:
    """The headers of the frames in ``data``, a run of whole stored frames as a read
    returns them (``PartitionLog.read``), positions relative to ``data``. Public as
    ``segments.iter_frames``: the one way above storage to walk stored frames."""
    return iter_headers(data)


def crc_ok(buf: FrameBuffer, header: FrameHeader) -> bool:
    """Whether the frame's bytes still match its checksum."""
    view = memoryview(buf)[header.position + CRC_START : header.end]
    try:
        return zlib.crc32(view) == header.crc32
    finally:
        view.release()


def body_of(frame: bytes) -> bytes:
    """The producer's part of a frame (what ``encode_frame`` was given)."""
    return frame[HEADER_SIZE:]
