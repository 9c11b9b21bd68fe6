"""Offline, read-only inspection of one partition directory (``streamd inspect``).

``inspect_partition(path)`` lists every segment, its batches (the frame headers), its
``.index``/``.timeindex`` entries and ``partition.json``, checks each against the log,
and returns a ``PartitionReport``; the CLI prints it. The frame bodies are opaque
here, as everywhere in ``segments``: a caller that knows the record format passes
``describe``, called with each batch's serialized ``RecordBatch`` and its
``BatchInfo`` to fill in the codec, the records and any notes (the CLI decodes
records with ``--records``).

**Strictly read-only.** Files are opened ``O_RDONLY`` and read with ``pread``; nothing
here opens a ``PartitionLog``, a ``Segment`` or runs recovery, since they truncate,
preallocate and rebuild files. ``pread`` rather than ``mmap``: a broker still running
may shrink its active ``.log`` (seal on roll), and a read past the new end of a map is
SIGBUS, while ``pread`` just returns fewer bytes.

Checks (each problem is an *error* or a *warning*):

- batches: checksum (``CORRUPT``), offsets continuing from the segment's base offset
  and from one batch to the next, append times not going back, and whatever
  ``describe`` notes (the CLI: that the body decodes to ``record_count`` records). A
  batch with a bad checksum whose header parses is reported and the walk goes on
  after it.
- the end of each ``.log``: bytes after the last readable batch are a *torn tail*
  (a frame cut short, or garbage: an error, as crash recovery would cut them) unless
  they are all zeros. Zeros after the last batch of the **last** segment are the
  preallocated space of the active segment, left as is by an unclean stop or a running
  broker; recovery drops them and no record is lost, so they are a warning (this
  departs from treating every tail as torn: ``--verify`` after ``kill -9`` with no data
  lost should pass). In an earlier, sealed segment, any tail is an error: reads of
  that segment fail.
- segments: each one's base offset (its file name) equals the previous one's next
  offset. With ``segment`` only that segment is read, so this check is skipped.
- indexes: per entry (``.index`` relative offset -> position: entry 0 is (0, 0),
  strictly increasing, the position is a batch boundary holding that base offset;
  ``.timeindex`` timestamp -> relative offset: the offset is a batch's base offset in
  the segment, the timestamp its append time, both never decreasing, and it matches
  the ``.index`` entry of the same number). The used entries of a preallocated file
  are counted as the broker counts them (``index.used_entries``); the zeros after them
  are not problems, but non-zero bytes there are (a garbled entry hides the rest from
  that count). A missing index file is a warning: the broker rebuilds it.
- ``partition.json`` unreadable, a recovery point that does not sit on a batch
  boundary, leftover ``*.deleted``/``*.tmp``/index-without-log files: warnings
  (recovery copes with each).

Every loop is bounded by a file size or an entry count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .batch import _TAGS, FRAME_TAG, HEADER, HEADER_SIZE, FrameHeader, crc_ok, read_header
from .index import OFFSET_ENTRY, TIME_ENTRY, check_entries, used_entries
from .layout import (
    CLEAN_SHUTDOWN_FILE,
    DELETED_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    SEGMENT_FILE,
    STATE_FILE,
    TEMP_SUFFIX,
    TIME_INDEX_SUFFIX,
    segment_name,
)

ERROR = "error"
WARNING = "warning"
_CHUNK = 1 << 22  # bytes read at a time when scanning a tail
#: The frame minus its tag and length prefix is a serialized RecordBatch (``batch``).
_MESSAGE_START = 6


class NotAPartition(ValueError):
    """``path`` is not a partition directory (or has no segment ``base_offset``)."""


# -- the report --------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    severity: str  # ERROR or WARNING
    file: str
    message: str
    position: int | None = None  # byte position in ``file``, or entry number of an index
    offset: int | None = None


@dataclass
class BatchInfo:
    position: int
    size_bytes: int
    base_offset: int
    record_count: int
    append_time_ms: int
    codec: str  # none, lz4, unknown(N) or ? (the body does not parse, or no ``describe``)
    checksum_ok: bool
    min_timestamp_ms: int | None = None  # of the records; known with ``records``
    max_timestamp_ms: int | None = None
    records: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)  # problems other than the checksum

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1


@dataclass
class IndexEntry:
    number: int
    relative_offset: int
    offset: int
    position: int | None = None  # .index entries
    timestamp_ms: int | None = None  # .timeindex entries
    problem: str | None = None


@dataclass
class IndexInfo:
    file: str
    present: bool
    file_bytes: int
    capacity: int  # entries the file has room for (preallocated ones included)
    used: int
    entries: list[IndexEntry]  # the used ones, then any non-zero unused one


@dataclass
class TailInfo:
    """Bytes after the last readable batch of a ``.log``."""

    position: int
    size_bytes: int
    nonzero_bytes: int
    reason: str


@dataclass
class SegmentInfo:
    file: str
    base_offset: int
    file_bytes: int
    data_bytes: int  # where the last readable batch ends
    next_offset: int
    batches: list[BatchInfo]
    offset_index: IndexInfo
    time_index: IndexInfo
    tail: TailInfo | None
    # False when the last batch fails its checksum: its record count proves nothing, so
    # next_offset is the next segment's base, else the recovery point, else the end of
    # the last batch that verifies (what the broker keeps as the log end).
    end_verified: bool = True


@dataclass
class PartitionReport:
    path: str
    topic: str | None
    partition: int | None
    state: dict[str, Any] | None  # partition.json as stored
    clean_shutdown: bool
    segment_bases: list[int]  # every segment present, scanned or not
    log_start_offset: int | None
    log_end_offset: int | None  # None when the last segment was not scanned
    segments: list[SegmentInfo]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]


# -- reading (pure: files in, report out) -------------------------------------------
#: ``describe(record_batch, info)``: fill in ``info`` (codec, records, notes) from the
#: batch's serialized ``RecordBatch``; called for every batch, in order.
Describe = Callable[[bytes, "BatchInfo"], None]


def partition_names(path: Path | str) -> tuple[str, int | None]:
    """(topic, partition) a partition directory's path names: its parent's name and
    its own (None when that is not a number)."""
    directory = Path(path)
    return directory.resolve().parent.name, _int_or_none(directory.name)


def inspect_partition(path: Path | str, *, segment: int | None = None,
                      describe: Describe | None = None) -> PartitionReport:
    """Read the partition directory ``path`` (never writing to it) and check it; only
    the segment with base offset ``segment`` if given; ``describe`` each batch (module
    docstring; None: the codec stays ``?``)."""
    directory = Path(path)
    bases, leftovers = _list_files(directory)
    problems = [Problem(WARNING, name, "leftover file; the broker removes it on start") for name in leftovers]
    state = _read_state(directory, problems)
    if segment is not None and segment not in bases:
        raise NotAPartition(f"{directory} has no segment with base offset {segment} "
                            f"(segments: {', '.join(map(str, bases)) or 'none'})")
    topic, partition = partition_names(directory)
    selected = [segment] if segment is not None else bases
    segments = [_inspect_segment(directory, base, last=base == bases[-1], describe=describe, problems=problems)
                for base in selected]
    for previous, info in zip(segments, segments[1:] + [None], strict=True):
        if not previous.end_verified:
            previous.next_offset = _trusted_end(previous, info, state)
        elif info is not None and info.base_offset != previous.next_offset:
            problems.append(Problem(ERROR, info.file, f"segment starts at offset {info.base_offset} but the "
                                    f"previous one ends at {previous.next_offset} (offsets are not contiguous)",
                                    0, info.base_offset))
    if state is not None:
        _check_recovery_point(state, segments, problems)
    start = state.get("log_start_offset") if state else None
    log_start = max(start if isinstance(start, int) else 0, bases[0]) if bases else None
    log_end = segments[-1].next_offset if segments and segments[-1].base_offset == bases[-1] else None
    return PartitionReport(str(directory), topic, partition, state, (directory / CLEAN_SHUTDOWN_FILE).exists(),
                           bases, log_start, log_end, segments, problems)


def _trusted_end(seg: SegmentInfo, following: SegmentInfo | None, state: dict[str, Any] | None) -> int:
    """The next offset of ``seg`` whose last batch fails its checksum (see SegmentInfo)."""
    verified = [b for b in seg.batches if b.checksum_ok]
    end = verified[-1].last_offset + 1 if verified else seg.base_offset
    if following is not None:
        return following.base_offset
    point = (state or {}).get("recovery_point")
    if isinstance(point, dict) and point.get("base_offset") == seg.base_offset \
            and isinstance(point.get("offset"), int):
        return max(int(point["offset"]), end)
    return end


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _list_files(directory: Path) -> tuple[list[int], list[str]]:
    """(base offsets of the ``.log`` files, names of leftover files)."""
    if not directory.is_dir():
        raise NotAPartition(f"{directory} is not a directory")
    logs, indexes, leftovers = set(), set(), []
    names = sorted(p.name for p in directory.iterdir())
    for name in names:
        match = SEGMENT_FILE.fullmatch(name)
        if match and match.group(2) == LOG_SUFFIX:
            logs.add(int(match.group(1)))
        elif match:
            indexes.add((int(match.group(1)), name))
        elif name.endswith((DELETED_SUFFIX, TEMP_SUFFIX)):
            leftovers.append(name)
    if not logs and STATE_FILE not in names:
        raise NotAPartition(f"{directory} is not a partition directory (no segment .log files, no {STATE_FILE})")
    leftovers += [name for base, name in sorted(indexes) if base not in logs]
    return sorted(logs), leftovers


def _read_state(directory: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        state = json.loads((directory / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        problems.append(Problem(WARNING, STATE_FILE, f"unreadable ({exc}); recovery scans the last segment"))
        return None
    if not isinstance(state, dict):
        problems.append(Problem(WARNING, STATE_FILE, "not a JSON object; recovery scans the last segment"))
        return None
    return state


def _check_recovery_point(state: dict[str, Any], segments: list[SegmentInfo], problems: list[Problem]) -> None:
    point = state.get("recovery_point")
    if not isinstance(point, dict):
        return
    for seg in segments:
        if seg.base_offset != point.get("base_offset"):
            continue
        ends: dict[object, int] = {b.position: b.base_offset for b in seg.batches}
        ends[seg.data_bytes] = seg.next_offset
        if ends.get(point.get("position")) != point.get("offset"):
            problems.append(Problem(WARNING, STATE_FILE, f"recovery point {point} is not a batch boundary of "
                                    f"{seg.file}; recovery would scan that segment from its start"))


def _inspect_segment(directory: Path, base: int, *, last: bool, describe: Describe | None,
                     problems: list[Problem]) -> SegmentInfo:
    stem = segment_name(base)
    name = stem + LOG_SUFFIX
    fd = os.open(directory / name, os.O_RDONLY)
    try:
        file_bytes = os.fstat(fd).st_size
        batches, data_end = _walk(fd, file_bytes, base, name, problems,
                                  describe=describe)
        tail = _tail(fd, data_end, file_bytes) if data_end < file_bytes else None
    finally:
        os.close(fd)
    next_offset = batches[-1].base_offset + batches[-1].record_count if batches else base
    end_verified = not batches or batches[-1].checksum_ok
    if tail is not None:
        problems.append(_tail_problem(name, tail, last=last))
    by_position = {b.position: b for b in batches}
    offset_index = _read_index(directory / (stem + INDEX_SUFFIX), OFFSET_ENTRY, base, data_end, problems)
    time_index = _read_index(directory / (stem + TIME_INDEX_SUFFIX), TIME_ENTRY, base, data_end, problems)
    _check_offset_index(offset_index, by_position, base, data_end, problems)
    _check_time_index(time_index, offset_index, {b.base_offset: b for b in batches}, next_offset, problems)
    return SegmentInfo(name, base, file_bytes, data_end, next_offset, batches, offset_index, time_index, tail,
                       end_verified)


def _walk(fd: int, file_bytes: int, base: int, name: str, problems: list[Problem],
          describe: Describe | None) -> tuple[list[BatchInfo], int]:
    """Every batch from byte 0 while headers parse; (batches, end of the last one)."""
    batches: list[BatchInfo] = []
    position, expected, last_time = 0, base, None
    while position < file_bytes:  # advances by at least HEADER_SIZE per batch
        header = read_header(os.pread(fd, HEADER_SIZE, position), 0, file_bytes - position)
        if header is None:
            break
        header = header._replace(position=position)
        frame = os.pread(fd, header.size, position)
        if len(frame) != header.size:  # the file shrank under us (a live broker)
            break
        batch = _batch_info(frame, header, describe)
        if header.base_offset != expected:
            batch.notes.append(f"base offset {header.base_offset} does not continue the offsets (expected "
                               f"{expected})")
        if last_time is not None and header.append_time_ms < last_time:
            batch.notes.append(f"append time {header.append_time_ms} is before the previous batch's {last_time}")
        if not batch.checksum_ok:
            problems.append(Problem(ERROR, name, f"checksum mismatch in batch at offset {header.base_offset} "
                                    f"(CORRUPT)", position, header.base_offset))
        problems.extend(Problem(ERROR, name, note, position, header.base_offset) for note in batch.notes)
        batches.append(batch)
        expected, last_time = header.next_offset, max(header.append_time_ms, last_time or header.append_time_ms)
        position = header.end
    return batches, position


def _batch_info(frame: bytes, header: FrameHeader, describe: Describe | None) -> BatchInfo:
    ok = crc_ok(frame, header._replace(position=0))
    info = BatchInfo(header.position, header.size, header.base_offset, header.record_count,
                     header.append_time_ms, "?", ok)
    if describe is not None:
        describe(frame[_MESSAGE_START:], info)
    return info


def _why_not_a_frame(head: bytes, remaining: int) -> str:
    """Why ``read_header`` refused the bytes at a position (``remaining`` to the end)."""
    if remaining < HEADER_SIZE:
        return f"{remaining} bytes, fewer than a frame header"
    tag, raw_len, t1, _, t2, base, t3, _, t4, count = HEADER.unpack_from(head)
    if tag != FRAME_TAG:
        return f"byte {tag:#04x} where a frame starts"
    if (t1, t2, t3, t4) != _TAGS:
        return "frame header fields have the wrong tags"
    if not all(b & 0x80 for b in raw_len[:4]) or raw_len[4] & 0x80:
        return "bad frame length"
    length = sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw_len))
    if length + 6 > remaining:
        return f"a frame of {length + 6} bytes runs past the end of the file"
    return f"bad frame header (length {length + 6}, base offset {base}, record count {count})"


def _tail(fd: int, position: int, file_bytes: int) -> TailInfo:
    nonzero = 0
    for start in range(position, file_bytes, _CHUNK):
        chunk = os.pread(fd, min(_CHUNK, file_bytes - start), start)
        nonzero += int(np.count_nonzero(np.frombuffer(chunk, dtype=np.uint8)))
    reason = _why_not_a_frame(os.pread(fd, HEADER_SIZE, position), file_bytes - position)
    return TailInfo(position, file_bytes - position, nonzero, reason)


def _tail_problem(name: str, tail: TailInfo, *, last: bool) -> Problem:
    if not tail.nonzero_bytes:
        if last:
            return Problem(WARNING, name, f"zero fill: {tail.size_bytes} bytes after the last batch (the active "
                           "segment's preallocation; recovery drops it, no record is lost)", tail.position)
        return Problem(ERROR, name, f"zero fill: {tail.size_bytes} bytes after the last batch of a sealed "
                       "segment", tail.position)
    return Problem(ERROR, name, f"torn tail: {tail.size_bytes} bytes after the last valid batch "
                   f"({tail.nonzero_bytes} non-zero; at position {tail.position}: {tail.reason})", tail.position)


def _read_index(path: Path, dtype: np.dtype, base: int, data_end: int, problems: list[Problem]) -> IndexInfo:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if data_end:
            problems.append(Problem(WARNING, path.name, "missing; the broker rebuilds it from the log"))
        return IndexInfo(path.name, False, 0, 0, 0, [])
    if len(raw) % dtype.itemsize:
        problems.append(Problem(ERROR, path.name, f"file size {len(raw)} is not a whole number of "
                                f"{dtype.itemsize}-byte entries"))
    array = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
    used = used_entries(array["relative_offset"], has_data=data_end > 0)
    garbled = np.flatnonzero(array[used:].view(np.uint8).reshape(-1, dtype.itemsize).any(axis=1)) + used
    entries = [_entry(array, int(i), base) for i in [*range(used), *garbled.tolist()]]
    for e in entries[used:]:
        e.problem = f"not zero, but past the {used} used entries"
    return IndexInfo(path.name, True, len(raw), len(array), used, entries)


def _entry(array: np.ndarray, i: int, base: int) -> IndexEntry:
    row = array[i]
    rel = int(row["relative_offset"])
    if "position" in (array.dtype.names or ()):
        return IndexEntry(i, rel, base + rel, position=int(row["position"]))
    return IndexEntry(i, rel, base + rel, timestamp_ms=int(row["timestamp_ms"]))


def _check_offset_index(index: IndexInfo, by_position: dict[int, BatchInfo], base: int, data_end: int,
                        problems: list[Problem]) -> None:
    previous: tuple[int, int] | None = None  # (relative offset, position)
    for e in index.entries[: index.used]:
        assert e.position is not None
        batch = by_position.get(e.position)
        if e.number == 0 and (e.relative_offset, e.position) != (0, 0):
            e.problem = "the first entry is not (0, 0)"
        elif previous is not None and (e.relative_offset <= previous[0] or e.position <= previous[1]):
            e.problem = "not increasing"
        elif e.position >= data_end:
            e.problem = f"position {e.position} is beyond the {data_end} bytes of batches"
        elif batch is None:
            e.problem = f"position {e.position} is not at a batch boundary"
        elif batch.base_offset != e.offset:
            e.problem = f"the batch at position {e.position} has base offset {batch.base_offset}"
        previous = (e.relative_offset, e.position)
    _report_entries(index, problems)
    if index.present and not any(e.problem for e in index.entries):
        positions = np.array([(e.relative_offset, e.position) for e in index.entries], dtype=OFFSET_ENTRY)
        times = np.array([(0, e.relative_offset, 0) for e in index.entries], dtype=TIME_ENTRY)
        reason = check_entries(positions, times, data_end)  # the broker's own test of the file
        if reason:
            problems.append(Problem(ERROR, index.file, reason))


def _check_time_index(index: IndexInfo, offsets: IndexInfo, by_offset: dict[int, BatchInfo], next_offset: int,
                      problems: list[Problem]) -> None:
    previous: tuple[int, int] | None = None  # (relative offset, timestamp)
    for e in index.entries[: index.used]:
        assert e.timestamp_ms is not None
        batch = by_offset.get(e.offset)
        twin = offsets.entries[e.number] if e.number < offsets.used else None
        if previous is not None and (e.relative_offset <= previous[0] or e.timestamp_ms < previous[1]):
            e.problem = "not increasing"
        elif e.offset >= next_offset:
            e.problem = f"offset {e.offset} is beyond the segment (next offset {next_offset})"
        elif batch is None:
            e.problem = f"offset {e.offset} is not a batch's base offset"
        elif batch.append_time_ms != e.timestamp_ms:
            e.problem = f"the batch's append time is {batch.append_time_ms}"
        elif offsets.present and (twin is None or twin.relative_offset != e.relative_offset):
            e.problem = f"{offsets.file} entry {e.number} is for another batch"
        previous = (e.relative_offset, e.timestamp_ms)
    _report_entries(index, problems)
    if index.present and offsets.present and index.used != offsets.used:
        problems.append(Problem(ERROR, index.file, f"{index.used} entries but {offsets.file} has {offsets.used}"))


def _report_entries(index: IndexInfo, problems: list[Problem]) -> None:
    problems.extend(Problem(ERROR, index.file, f"entry {e.number} ({_entry_text(e)}): {e.problem}", e.number,
                            e.offset) for e in index.entries if e.problem)


def _entry_text(e: IndexEntry) -> str:
    if e.position is not None:
        return f"relative offset {e.relative_offset} -> position {e.position}"
    return f"timestamp {e.timestamp_ms} -> relative offset {e.relative_offset}"


