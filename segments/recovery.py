"""Loading a partition directory: state files and crash recovery (Kafka's LogLoader).

Files besides the segments::

    partition.json   {"version": 1, "log_start_offset": N,
                      "recovery_point": {"base_offset": B, "position": P, "offset": O}}
                     written atomically (``checkpoint.write_atomic``). Everything before
                     byte P of segment B (whose frame there has base offset O) is fsynced.
    clean-shutdown   empty marker written by ``PartitionLog.close`` and removed (durably)
                     on open, so it exists only while nothing can have been lost.

``load`` leaves the directory as a clean close would: every ``.log`` holds exactly its
valid frames, with trimmed, valid index files for the segments it scanned.

- Clean shutdown: files are trusted. Only the last segment's tail is walked (from its
  last index entry, headers only); if that does not end exactly at the file's end, at
  the recorded recovery point (close records the log end there), the last segment is
  damaged and the crash path runs from that point, which cuts nothing before it.
- Crash: frames are scanned only from the recovery point (the start of the last
  segment without state) to the end of the data. Each frame must parse, continue the
  offsets, not go back in time and match its CRC. The first invalid frame and
  everything after it is cut (a torn tail: never fsynced, so never acknowledged as
  durable): the file is truncated there, later segments whose base offset does not
  continue the log are deleted, index entries at or after the start point are dropped
  and re-added from the scan. Segments before the point are trusted as they are; their
  indexes are checked when first loaded (``Segment``), so start-up cost does not grow
  with the size of the log.
- The recovery point itself is trusted: what lies before it was fsynced, and the
  offsets below its offset may have been acknowledged and read. Bytes before it that
  do not verify (a flipped bit, a file cut short below it) are damage, kept as they are
  and reported as damaged ranges by the segment's walks (``segments.damage``); they are
  never cut, and the log end is never below the point's offset (``LoadResult.log_end``:
  the last segment's end offset, which ``PartitionLog`` gives the segment, so a header
  that fails its CRC cannot move it).

- Crash recovery writes what it kept past the start point again (the same bytes,
  ``pread`` then ``pwrite``) before its fsync: after a failed fsync (in this process,
  or in the one that crashed) the kernel may hold those pages clean although they
  never reached the disk, and an fsync would then skip them. What is written again
  was just checked, so the fsync makes exactly the recovered log durable.

Files are read with ``pread``, never through a map: a crashed active segment is sparse
(preallocated with ``ftruncate``), and a read fault on a hole of a full tmpfs needs a
page the filesystem cannot give (SIGBUS); ``pread`` of a hole reads zeros. Nothing here
needs free space: index files that cannot be written (ENOSPC) are removed instead
(they are caches; the segment rebuilds them in memory when loaded), and truncating the
cut tail gives space back. So a broker stopped on a full disk starts on it.

Leftover ``*.deleted``, ``*.tmp`` and index files without a log are removed.
Not thread-safe: runs once, before the log is shared.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .batch import HEADER_SIZE, FrameHeader, claimed_frame_size, crc_ok
from .checkpoint import fsync_directory, remove_durable, write_atomic
from .errors import is_disk_full
from .index import OffsetIndex, TimeIndex, check_entries
from .layout import (
    CLEAN_SHUTDOWN_FILE,
    DELETED_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    SEGMENT_NAME_DIGITS,
    STATE_FILE,
    TEMP_SUFFIX,
    TIME_INDEX_SUFFIX,
    segment_name,
)
from .segment import build_index_entries, walk_frames

log = logging.getLogger(__name__)

_SEGMENT_NAME = re.compile(rf"\d{{{SEGMENT_NAME_DIGITS}}}")
_CHUNK = 1 << 22


class RecoveryPoint(NamedTuple):
    """A flushed position: byte ``position`` of segment ``base_offset``, at ``offset``."""

    base_offset: int
    position: int
    offset: int


@dataclass(frozen=True)
class PartitionState:
    log_start_offset: int
    recovery_point: RecoveryPoint | None


@dataclass(frozen=True)
class RecoveryReport:
    """What a crash recovery scanned and cut."""

    segments_scanned: int
    bytes_scanned: int
    bytes_truncated: int
    batches_recovered: int
    segments_deleted: int = 0


@dataclass
class LoadResult:
    base_offsets: list[int]  # of the segments left, ascending
    report: RecoveryReport | None  # None after a clean shutdown
    state: PartitionState | None
    #: The offset after the last segment's data (None: no segments): the log end. Never
    #: below the recovery point's offset; the last segment's end offset (module docstring).
    log_end: int | None = None


def read_state(directory: Path) -> PartitionState | None:
    """The persisted state, or None if missing or unreadable (logged)."""
    path = Path(directory) / STATE_FILE
    try:
        raw = json.loads(path.read_bytes())
        point = raw.get("recovery_point")
        return PartitionState(
            int(raw["log_start_offset"]),
            RecoveryPoint(int(point["base_offset"]), int(point["position"]), int(point["offset"]))
            if point else None,
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def write_state(directory: Path, state: PartitionState) -> None:
    point = state.recovery_point._asdict() if state.recovery_point else None
    doc = {"version": 1, "log_start_offset": state.log_start_offset, "recovery_point": point}
    write_atomic(Path(directory) / STATE_FILE, json.dumps(doc, sort_keys=True).encode())


def mark_clean_shutdown(directory: Path) -> None:
    write_atomic(Path(directory) / CLEAN_SHUTDOWN_FILE, b"")


def load(directory: Path, *, index_interval_bytes: int, name: str) -> LoadResult:
    """Clean up, decide clean vs crash, recover if needed (see module docstring)."""
    directory = Path(directory)
    bases = _cleanup(directory)
    state = read_state(directory)
    clean = remove_durable(directory / CLEAN_SHUTDOWN_FILE)
    if not bases:
        return LoadResult([], None, state)
    if clean:
        end = _clean_end(directory, bases[-1], state, index_interval_bytes)
        if end is not None:
            return LoadResult(bases, None, state, end)
        log.warning("%s: clean-shutdown marker present but the last segment does not end at the recorded "
                    "log end; checking it from the recovery point", name,
                    extra={"event": "recovery", "partition_log": name})
    report, end = _recover(directory, bases, state, index_interval_bytes, name)
    fsync_directory(directory)  # segment files made since the last good fsync, and the deletions
    return LoadResult(bases, report, state, end)


def _cleanup(directory: Path) -> list[int]:
    """Remove garbage files; the base offsets of the segments present."""
    bases, indexes = set(), []
    for path in directory.iterdir():
        if path.name.endswith((DELETED_SUFFIX, TEMP_SUFFIX)):
            path.unlink()
        elif _SEGMENT_NAME.fullmatch(path.stem):
            if path.suffix == LOG_SUFFIX:
                bases.add(int(path.stem))
            elif path.suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                indexes.append(path)
    for path in indexes:
        if int(path.stem) not in bases:
            path.unlink()
    return sorted(bases)


class _Prefix(NamedTuple):
    """Trusted index entries before a position, and the log's state there."""

    offsets: np.ndarray
    times: np.ndarray
    next_offset: int
    last_time: int | None
    last_entry_position: int | None


def _paths(directory: Path, base: int) -> tuple[Path, Path, Path]:
    stem = directory / segment_name(base)
    return stem.with_suffix(LOG_SUFFIX), stem.with_suffix(INDEX_SUFFIX), stem.with_suffix(TIME_INDEX_SUFFIX)


def walk_file(fd: int, position: int, limit: int, *, expected_offset: int | None = None,
              min_time_ms: int | None = None, verify_crc: bool = False) -> Iterator[FrameHeader]:
    """``walk_frames`` over bytes ``[position, limit)`` of the file ``fd``, read with
    ``pread`` in windows of ``_CHUNK`` bytes (a larger frame gets a window of its
    own), so memory stays bounded and no read goes through a map (module docstring)."""
    size = _CHUNK
    while position < limit:
        want = min(size, limit - position)
        data = os.pread(fd, want, position)
        if len(data) < want:  # the file ends before limit
            limit = position + len(data)
        rel = 0
        for header in walk_frames(data, 0, len(data), expected_offset=expected_offset,
                                  min_time_ms=min_time_ms, verify_crc=verify_crc):
            rel = header.end
            if expected_offset is not None:
                expected_offset = header.next_offset
            if min_time_ms is not None:
                min_time_ms = header.append_time_ms
            yield header._replace(position=position + header.position)
        window_end = position + len(data)
        position += rel
        if window_end >= limit:
            return
        size = _CHUNK
        if position < window_end and window_end - position >= HEADER_SIZE:
            # Stopped inside the window: an invalid frame, or one that goes on past it.
            claimed = claimed_frame_size(data, rel, len(data))
            if claimed is None or rel + claimed <= len(data):
                return
            size = max(_CHUNK, claimed)


def _prefix(fd: int, directory: Path, base: int, position: int, interval: int) -> _Prefix | None:
    """Index entries for the frames before ``position`` (kept from the index files if
    valid, else rebuilt by a header walk), or None if no frame boundary is there."""
    _, index_path, time_path = _paths(directory, base)
    oi = OffsetIndex(index_path, base, capacity=None, data_size=position)
    ti = TimeIndex(time_path, base, capacity=None, data_size=position)
    try:
        offsets, times = oi.entries(), ti.entries()
    finally:
        oi.close()
        ti.close()
    keep = int(np.searchsorted(offsets["position"], position, side="left")) if len(offsets) else 0
    offsets, times = offsets[:keep], times[: min(keep, len(times))]
    if keep and check_entries(offsets, times, position) is None:
        start = int(offsets[-1]["position"])
        expected = base + int(offsets[-1]["relative_offset"])
        headers = list(walk_file(fd, start, position, expected_offset=expected))
        if headers and headers[-1].end == position \
                and headers[0].append_time_ms == int(times[-1]["timestamp_ms"]):
            last = headers[-1]
            return _Prefix(offsets, times, last.next_offset, last.append_time_ms, start)
    return _prefix_rebuilt(fd, base, position, interval)


def _prefix_rebuilt(fd: int, base: int, position: int, interval: int) -> _Prefix | None:
    headers = list(walk_file(fd, 0, position, expected_offset=base))
    if (headers[-1].end if headers else 0) != position:
        return None
    offsets, times = build_index_entries(iter(headers), base, interval)
    last = headers[-1] if headers else None
    return _Prefix(offsets, times, last.next_offset if last else base,
                   last.append_time_ms if last else None,
                   int(offsets[-1]["position"]) if len(offsets) else None)


def _prefix_damaged(fd: int, base: int, position: int, file_size: int, interval: int) -> _Prefix | None:
    """When ``_prefix`` fails: index entries for the frames before ``position`` up to
    the first one that does not continue the offsets (damage before a trusted recovery
    point: it is kept, and the segment's walks report it; the state after it is not
    known). None if the point is not the one the frames before it lead to, though
    they are whole: a frame that continues the offsets runs across ``position`` (a
    garbled ``partition.json``), or they end exactly there, the last one matching its
    CRC, at another offset (a point left stale by appends undone and replaced after
    it was saved); then the segment is scanned from its start."""
    headers = []
    for header in walk_file(fd, 0, file_size, expected_offset=base):
        if header.end > position:
            if header.position < position:
                return None
            break
        headers.append(header)
    if headers and headers[-1].end == position:
        last = headers[-1]
        frame = os.pread(fd, last.size, last.position)
        if len(frame) == last.size and crc_ok(frame, last._replace(position=0)):
            return None
    offsets, times = build_index_entries(iter(headers), base, interval)
    return _Prefix(offsets, times, base, None, int(offsets[-1]["position"]) if len(offsets) else None)


def _clean_end(directory: Path, base: int, state: PartitionState | None, interval: int) -> int | None:
    """After a clean shutdown: the log end the close recorded, if the last segment's
    tail (walked from its last index entry) ends there, at the end of the file."""
    point = state.recovery_point if state else None
    log_path = _paths(directory, base)[0]
    size = os.stat(log_path).st_size
    if point is None or point.base_offset != base or point.position != size:
        return None
    if size == 0:
        return point.offset if point.offset == base else None
    fd = os.open(log_path, os.O_RDONLY)
    try:
        prefix = _prefix(fd, directory, base, size, interval)
    finally:
        os.close(fd)
    return point.offset if prefix is not None and prefix.next_offset == point.offset else None


def _start(directory: Path, bases: list[int], state: PartitionState | None) -> tuple[int, int, int]:
    """(segment index, byte position, offset) where the crash scan starts."""
    point = state.recovery_point if state else None
    if point is None:
        return len(bases) - 1, 0, bases[-1]
    if point.base_offset in bases:
        i = bases.index(point.base_offset)
        if point.position >= 0 and point.offset >= bases[i]:
            return i, point.position, point.offset  # also past the file's end: see _scan_segment
        return i, 0, bases[i]
    later = [i for i, b in enumerate(bases) if b > point.base_offset]
    i = later[0] if later else len(bases) - 1
    return i, 0, bases[i]


@dataclass
class _Totals:
    scanned: int = 0
    bytes_scanned: int = 0
    bytes_truncated: int = 0
    batches: int = 0
    deleted: int = 0


def _recover(directory: Path, bases: list[int], state: PartitionState | None, interval: int,
             name: str) -> tuple[RecoveryReport, int]:
    """Scan from the recovery point (module docstring); the report and the log end."""
    i, position, expected = _start(directory, bases, state)
    totals = _Totals()
    last_time: int | None = None
    while i < len(bases):
        if position == 0 and bases[i] != expected:
            break
        expected, last_time = _scan_segment(directory, bases[i], position, expected, last_time,
                                            interval, name, totals)
        position = 0
        i += 1
    for base in bases[i:]:
        log_path = _paths(directory, base)[0]
        cut = _file_data_end(log_path)
        log.warning("%s: deleting segment %s after the end of the valid log (%d bytes)",
                    name, log_path, cut, extra={"event": "recovery", "partition_log": name, "bytes_truncated": cut})
        totals.bytes_truncated += cut
        totals.deleted += 1
        for path in _paths(directory, base):
            path.unlink(missing_ok=True)
    del bases[i:]
    return RecoveryReport(totals.scanned, totals.bytes_scanned, totals.bytes_truncated,
                          totals.batches, totals.deleted), expected


def _scan_segment(directory: Path, base: int, position: int, expected: int, last_time: int | None,
                  interval: int, name: str, totals: _Totals) -> tuple[int, int | None]:
    """Validate one segment from ``position`` (where a frame of offset ``expected``
    starts, or the data ends), cut it after its last valid frame, write what it kept
    again, fsync it and write its indexes; (next offset, last append time). The bytes
    before ``position`` are kept as they are even if they do not verify (damage before
    the recovery point, reported by the segment's walks), also if the file now ends
    before ``position``."""
    log_path, index_path, time_path = _paths(directory, base)
    fd = os.open(log_path, os.O_RDWR)
    try:
        file_size = os.fstat(fd).st_size
        prefix = _prefix(fd, directory, base, position, interval) if position <= file_size else None
        if prefix is None or prefix.next_offset != expected:
            prefix = _prefix_damaged(fd, base, position, file_size, interval)
            if prefix is None:
                position, expected = 0, base
                prefix = _Prefix(np.zeros(0, OffsetIndex.ENTRY), np.zeros(0, TimeIndex.ENTRY), base, None, None)
            else:
                log.warning("%s: %s does not verify before the recovery point (byte %d, offset %d); it is "
                            "kept, and reads report the damage", name, log_path, position, expected,
                            extra={"event": "recovery", "partition_log": name, "position": position})
            last_time = None
        elif position and prefix.last_time is not None:
            last_time = prefix.last_time
        headers = list(walk_file(fd, position, file_size, expected_offset=expected,
                                 min_time_ms=last_time, verify_crc=True))
        valid_end = headers[-1].end if headers else position
        cut = max(0, _data_end(fd, valid_end, file_size) - valid_end)
        if valid_end < file_size:
            os.ftruncate(fd, valid_end)  # first: it gives the preallocated tail's space back
        _write_again(fd, position, valid_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    offsets, times = build_index_entries(iter(headers), base, interval, prefix.last_entry_position)
    _write_indexes(index_path, time_path, np.concatenate([prefix.offsets, offsets]),
                   np.concatenate([prefix.times, times]), name)
    if cut:
        log.warning("%s: truncated %s at position %d, cutting %d bytes of invalid data",
                    name, log_path, valid_end, cut,
                    extra={"event": "recovery", "partition_log": name, "position": valid_end, "bytes_truncated": cut})
    totals.scanned += 1
    totals.bytes_scanned += max(0, valid_end - position)
    totals.bytes_truncated += cut
    totals.batches += len(headers)
    if headers:
        return headers[-1].next_offset, headers[-1].append_time_ms
    return expected, last_time


def _write_again(fd: int, start: int, end: int) -> None:
    """Write bytes ``[start, end)`` over themselves (module docstring: dirty again,
    so the next fsync really writes them). They have blocks: no space is needed."""
    for chunk_start in range(start, end, _CHUNK):
        data = os.pread(fd, min(_CHUNK, end - chunk_start), chunk_start)
        if os.pwrite(fd, data, chunk_start) != len(data):
            raise OSError(errno.EIO, f"short write rewriting {len(data)} bytes at position {chunk_start}")


def _write_indexes(index_path: Path, time_path: Path, offsets: np.ndarray, times: np.ndarray,
                   name: str) -> None:
    """Write a scanned segment's index files; on a full disk remove them instead."""
    try:
        OffsetIndex.write_file(index_path, offsets)
        TimeIndex.write_file(time_path, times)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        index_path.unlink(missing_ok=True)
        time_path.unlink(missing_ok=True)
        log.warning("%s: no space to write the indexes of %s; they are rebuilt in memory when loaded",
                    name, index_path.stem, extra={"event": "recovery", "partition_log": name})


def _file_data_end(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _data_end(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges that may hold data, skipping holes of a sparse file."""
    if not hasattr(os, "SEEK_DATA"):
        yield start, end
        return
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def _data_end(fd: int, start: int, end: int) -> int:
    """One past the last non-zero byte in ``[start, end)``, or ``start``: how much of
    a preallocated tail holds data (zeros and holes are not cut data)."""
    last = start
    for lo, hi in _data_regions(fd, start, end):
        for chunk_start in range(lo, hi, _CHUNK):
            chunk = np.frombuffer(os.pread(fd, min(hi, chunk_start + _CHUNK) - chunk_start, chunk_start),
                                  dtype=np.uint8)
            nonzero = np.flatnonzero(chunk)
            if nonzero.size:
                last = chunk_start + int(nonzero[-1]) + 1
    return last
