"""Damaged stretches of a segment's ``.log``: where they start, where good frames
resume, and which offsets they hold.

A segment's frames are dense: the frame at a byte position must start at the offset
the frame before it ends at (the segment's base offset at byte 0, an index entry's
offset where the entry points). A stretch is **damaged** where that frame does not
parse, names another base offset, or fails its CRC, and where the data ends before
the segment's end offset (the next segment's base offset, or the log end for the
active segment: a truncated file). Nothing in a damaged stretch is served, and
nothing around it is hidden: readers get the good frames up to it and then its
offsets, described by a ``DamagedRange``::

    first_offset     the offset the damaged frame should start at (from the walk)
    last_offset      the offset before the next good frame
    position         byte where the damage starts          (broker log only)
    resume_position  byte of that next good frame (or the end of the data)
    cause            why, in words that name no file or byte position

Where good frames resume (``locate``), in this order:

1. the frame right after the damaged one, if its header parses with the expected
   base offset (only the checksum failed, or the body is torn) and a valid frame
   starts where its length says;
2. otherwise the first valid frame found by a scan from the damage up to the next
   offset-index entry whose frame is valid (the index bounds the scan to about one
   index interval), or that entry's frame;
3. otherwise the end of the data, at the segment's end offset.

"Valid" there: the header parses, the CRC matches, and the base offset lies after
``first_offset`` and before the bound (the entry's offset or the end offset). A
false match needs a well-formed 34-byte header *and* a matching CRC-32 inside the
damaged bytes: a frame stored as a record's value could do it, nothing else
plausibly.

``check_tail`` is the start-up check of a sealed segment (``PartitionLog.open``): it
reads with ``pread`` (no map) the last index entry and the frame headers from there
to the end of the file, so its cost is one index entry plus about one index interval
of bytes per segment, whatever the segment's size. It finds what a clean-shutdown
marker cannot vouch for: a file cut short (or garbled at its end) after it was
sealed.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .batch import CRC_START, FRAME_TAG, HEADER_SIZE, FrameHeader, crc_ok, read_header
from .index import OFFSET_ENTRY

if TYPE_CHECKING:
    from .batch import FrameBuffer

#: Causes, as messages and metadata show them (stable words; no paths, no positions).
CHECKSUM = "a stored batch failed its checksum"
HEADER = "a stored batch header is garbled"
TRUNCATED = "the segment file ends before its last offset"

#: A frame header's fixed bytes (``segments.batch``): tag, a 5-byte padded varint,
#: then the four header fields' tags at their fixed positions.
_CANDIDATE = re.compile(rb"\x0a[\x80-\xff]{4}[\x00-\x7f]\x0d.{4}\x11.{8}\x19.{8}\x25", re.DOTALL)
_TAIL_CHUNK = 64 * 1024
_ENTRY = struct.Struct("<II")  # OFFSET_ENTRY, read with pread


class DamagedRange(NamedTuple):
    first_offset: int
    last_offset: int
    position: int
    resume_position: int
    cause: str

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1


def valid_frame(buf: FrameBuffer, position: int, limit: int, above: int, below: int | None) -> FrameHeader | None:
    """The frame at ``position`` if its header parses, its CRC matches and its base
    offset is in ``(above, below)`` (``below`` None: no upper bound)."""
    header = read_header(buf, position, limit)
    if header is None or header.base_offset <= above:
        return None
    if below is not None and header.base_offset >= below:
        return None
    return header if crc_ok(buf, header) else None


def locate(
    buf: FrameBuffer,
    position: int,
    expected: int,
    *,
    limit: int,
    end_offset: int | None,
    next_entry: tuple[int, int] | None,
    cause: str,
) -> DamagedRange | None:
    """The damaged stretch at ``position`` (where a frame starting at offset
    ``expected`` should be), or None if no offset is missing there (bytes after the
    last frame of a sealed segment that hold nothing). ``next_entry``: the first
    offset-index entry after ``position``, as (offset, position)."""
    if position >= limit:
        if end_offset is None or end_offset <= expected:
            return None
        return DamagedRange(expected, end_offset - 1, position, limit, TRUNCATED)
    bound_offset, bound_position = end_offset, limit
    if next_entry is not None:
        entry_offset, entry_position = next_entry
        entry = read_header(buf, entry_position, limit)
        if (entry_position > position and entry is not None and entry.base_offset == entry_offset
                and entry_offset > expected and crc_ok(buf, entry)):
            bound_offset, bound_position = entry_offset, entry_position
    header = read_header(buf, position, limit)
    if header is not None and header.base_offset == expected:
        # Only the checksum failed: trust the length if a valid frame starts after it.
        if header.end == bound_position:
            return _range(expected, bound_offset, position, bound_position, cause)
        after = valid_frame(buf, header.end, limit, expected, bound_offset)
        if after is not None:
            return _range(expected, after.base_offset, position, after.position, cause)
    for match in _CANDIDATE.finditer(buf, position + 1, bound_position):
        found = valid_frame(buf, match.start(), limit, expected, bound_offset)
        if found is not None:
            return _range(expected, found.base_offset, position, found.position, cause)
    if bound_position == limit and header is None and _runs_past_the_end(buf, position, limit, expected):
        cause = TRUNCATED  # the expected frame starts here and the file ends inside it
    return _range(expected, bound_offset, position, bound_position, cause)


def _range(first: int, resume_offset: int | None, position: int, resume_position: int, cause: str) -> DamagedRange | None:
    if resume_offset is None:  # the end is unknown: at least the frame expected here
        return DamagedRange(first, first, position, resume_position, cause)
    if resume_offset <= first:
        return None
    return DamagedRange(first, resume_offset - 1, position, resume_position, cause)


def _runs_past_the_end(buf: FrameBuffer, position: int, limit: int, expected: int) -> bool:
    """Whether the bytes at ``position`` are the start of the expected frame, cut off
    by the end of the data (a truncated file), rather than garbage. A frame whose bytes
    up to the end of the data still match its CRC is whole: only its length is garbled."""
    if limit - position < HEADER_SIZE:
        return bool(buf[position] == FRAME_TAG)
    header = read_header(buf, position, 1 << 62)
    if header is None or header.base_offset != expected or header.end <= limit:
        return False
    with memoryview(buf)[position + CRC_START : limit] as rest:
        return zlib.crc32(rest) != header.crc32


# -- the start-up check of a sealed segment -------------------------------------------------------
class TailCheck(NamedTuple):
    """What ``check_tail`` found: the damage at the end of the file (None: none), and
    the newest append time in the headers it read (None: it read none it trusts)."""

    damage: DamagedRange | None
    last_append_time_ms: int | None
    checked: bool  # False: the index gave no usable starting point (checked on first read)


def check_tail(log_path: Path, index_path: Path, *, size: int, base_offset: int, end_offset: int) -> TailCheck:
    """Walk the frame headers of a sealed segment from its last usable index entry to
    the end of the file (``pread``, no map; see the module docstring for the cost).
    As the segment's own walks do, a header whose successor (or the end offset)
    disagrees with its length or record count is checked against its CRC: then the
    damage starts there, not at the intact frame after it."""
    fd = os.open(log_path, os.O_RDONLY)
    try:
        start = _last_entry(fd, index_path, size, base_offset)
        if start is None:
            return TailCheck(None, None, False)
        expected, position = start
        last_time, previous = None, None
        chunk, chunk_at = b"", position
        while position < size:
            if position + HEADER_SIZE > chunk_at + len(chunk):
                chunk_at, chunk = position, os.pread(fd, min(_TAIL_CHUNK, size - position), position)
            header = read_header(chunk, position - chunk_at, size - chunk_at)
            if header is None or header.base_offset != expected:
                break
            last_time, previous = header.append_time_ms, header._replace(position=position)
            position, expected = position + header.size, header.next_offset
        if position == size and expected == end_offset:
            return TailCheck(None, last_time, True)
        if previous is not None and not _frame_crc_ok(fd, previous):
            position, expected = previous.position, previous.base_offset  # its header broke the chain
        rest = os.pread(fd, size - position, position)  # about one index interval
        found = locate(rest, 0, expected, limit=len(rest), end_offset=end_offset, next_entry=None,
                       cause=HEADER if position < size else TRUNCATED)
        if found is not None:
            found = found._replace(position=position, resume_position=position + found.resume_position)
        return TailCheck(found, last_time, True)
    finally:
        os.close(fd)


def _frame_crc_ok(fd: int, header: FrameHeader) -> bool:
    frame = os.pread(fd, header.size, header.position)
    return len(frame) == header.size and crc_ok(frame, header._replace(position=0))


def _last_entry(fd: int, index_path: Path, size: int, base_offset: int) -> tuple[int, int] | None:
    """(offset, position) of the last index entry below ``size`` whose frame header
    names its offset; (base_offset, 0) for an empty index; None if the index is
    missing or its last entries are garbled (reads then rebuild it). A few ``pread``s:
    the last entry, or a binary search for the last one below ``size`` (a file cut
    short leaves entries that point past its end)."""
    try:
        ifd = os.open(index_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        count = os.fstat(ifd).st_size // OFFSET_ENTRY.itemsize
        if count == 0:
            return base_offset, 0

        def entry(i: int) -> tuple[int, int]:
            rel, position = _ENTRY.unpack(os.pread(ifd, _ENTRY.size, i * _ENTRY.size))
            return base_offset + rel, position

        lo, hi = 0, count  # the first entry at or past the end of the data
        if entry(count - 1)[1] < size:
            lo = count
        while lo < hi:
            mid = (lo + hi) // 2
            if entry(mid)[1] < size:
                lo = mid + 1
            else:
                hi = mid
        for i in (lo - 1, lo - 2):  # the last usable entry, or the one before it
            if i < 0:
                break
            offset, position = entry(i)
            if position == 0:
                return base_offset, 0
            raw = os.pread(fd, HEADER_SIZE, position)
            header = read_header(raw, 0, size - position) if len(raw) == HEADER_SIZE else None
            if header is not None and header.base_offset == offset:
                return offset, position
        return None
    finally:
        os.close(ifd)
