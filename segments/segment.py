"""One segment of a partition: a ``.log`` file of frames plus its two indexes.

Files, named by the segment's base offset (the first batch's offset), 20 digits::

    00000000000000000000.log        frames (``segments.batch``), back to back from byte 0
    00000000000000000000.index      OffsetIndex (``segments.index``)
    00000000000000000000.timeindex  TimeIndex

States:

- **active** (the partition's last segment): the ``.log`` is preallocated with
  ``ftruncate`` (sparse) to its capacity and mapped with ``mmap`` for reads; an append
  is a ``pwrite`` at the end of the data. Bytes past ``size`` are zeros (a zero tag byte ends the data).
  The indexes are writable memmaps. File descriptors stay open for ``sync_fds``.
- **loaded, not active**: a partition's last segment when there was no room to
  preallocate its indexes (a full disk at start-up): readable like a sealed one,
  ``activate`` is tried again by the next append.
- **sealed** (``seal`` on roll or close): every file is truncated to its real size; the
  log and indexes are mapped read-only lazily, on the first read, at that size. The
  descriptors kept from the active state are closed by ``release_fds`` once synced.

Invariants: frames are dense (each batch's base offset is the previous batch's next
offset, the first is ``base_offset``), append times never decrease, a sealed segment is
not empty, every position fits in uint32. Indexes are validated when first loaded and
rebuilt from the log (header scan) if missing or garbled.

Damage (``segments.damage``): every walk over the frames checks that each continues
the offsets, so a frame that does not (or fails its CRC where it is served or trusted)
is a ``DamagedRange``, found once and remembered by position. Reads return the good
frames before it and report it (``SegmentRead.damage``); lookups of an offset in it
raise ``CorruptRecords``; walks go on at its resume position. A sealed segment knows
its end offset (the next segment's base offset, set by ``PartitionLog``), so a file
that ends early is a damaged range too.

Full disks: an append is all or nothing. The log's blocks are reserved with
``posix_fallocate`` ahead of the data (``RESERVE_CHUNK_BYTES`` at a time, or just what
the append needs) before its first byte is written, so no space is an OSError
(ENOSPC) before anything changed, and writeback never needs blocks the filesystem no
longer has; a write that still fails part-way (a filesystem that cannot preallocate)
is zeroed again before the error is raised. Reads touch only bytes below ``size``,
which were written, so a read through the map never faults on a hole (on a full
tmpfs that would be SIGBUS: a hole needs a page to be read through a shared map).
A sealed file cut short after it was mapped would fault the same way: ``check_size``
(a ``stat``, once per segment per read call) and the first mapping (``fstat``) shrink
``size`` to the file's, and what it lost is a damaged range; a cut between the check and
the read is not caught (files must not be truncated under a running broker).

Not thread-safe: ``PartitionLog`` serializes every call. Nothing here keeps a
``memoryview`` of a map: reads copy (``mmap`` slicing returns ``bytes``).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import damage as damages
from .batch import FrameHeader, crc_ok, iter_headers, read_header
from .damage import CHECKSUM, HEADER, TRUNCATED, DamagedRange
from .errors import CorruptBatch, CorruptRecords, StorageError, is_disk_full
from .index import (
    MAX_RELATIVE_OFFSET,
    OFFSET_ENTRY,
    TIME_ENTRY,
    OffsetIndex,
    TimeIndex,
    check_entries,
    index_capacity,
    index_due,
)
from .layout import DELETED_SUFFIX, INDEX_SUFFIX, LOG_SUFFIX, TIME_INDEX_SUFFIX, segment_name
from .limits import ReadLimits

if TYPE_CHECKING:
    from .batch import FrameBuffer

log = logging.getLogger(__name__)

#: How far ahead of the data an active segment's blocks are reserved (one
#: posix_fallocate per this many bytes appended, not one per append).
RESERVE_CHUNK_BYTES = 1 << 20
_NO_BOUND = 1 << 63  # an end_offset no frame reaches
_ZEROS = bytes(1 << 16)


def walk_frames(
    buf: FrameBuffer,
    position: int,
    limit: int,
    *,
    expected_offset: int | None = None,
    min_time_ms: int | None = None,
    verify_crc: bool = False,
) -> Iterator[FrameHeader]:
    """Yield the headers of consecutive valid frames from ``position`` up to ``limit``;
    stop silently at the first invalid one (the caller compares the last ``end``).
    With ``expected_offset`` each frame must continue the offsets; with ``min_time_ms``
    append times must not decrease; with ``verify_crc`` the checksum must match."""
    for header in iter_headers(buf, position, limit):
        if expected_offset is not None:
            if header.base_offset != expected_offset:
                return
            expected_offset = header.next_offset
        if min_time_ms is not None:
            if header.append_time_ms < min_time_ms:
                return
            min_time_ms = header.append_time_ms
        if verify_crc and not crc_ok(buf, header):
            return
        yield header


def build_index_entries(
    headers: Iterator[FrameHeader], base_offset: int, index_interval_bytes: int,
    last_entry_position: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The index entries the sparse schedule gives ``headers`` (offset, time arrays)."""
    offsets, times = [], []
    for h in headers:
        if index_due(last_entry_position, h.position, index_interval_bytes):
            rel = h.base_offset - base_offset
            offsets.append((rel, h.position))
            times.append((h.append_time_ms, rel, 0))
            last_entry_position = h.position
    return np.array(offsets, dtype=OFFSET_ENTRY), np.array(times, dtype=TIME_ENTRY)


def _always(header: FrameHeader) -> bool:
    return True


class SegmentRead(NamedTuple):
    data: bytes
    batch_count: int
    record_count: int
    next_offset: int
    #: The damaged stretch the read stopped at (its good frames before it are ``data``).
    damage: DamagedRange | None = None


class Segment:
    """A ``.log`` file with its ``.index`` and ``.timeindex`` (see module docstring)."""

    def __init__(self, directory: Path, base_offset: int, *, index_interval_bytes: int) -> None:
        self.directory = Path(directory)
        self.base_offset = base_offset
        stem = self.directory / segment_name(base_offset)
        self.log_path = stem.with_suffix(LOG_SUFFIX)
        self.index_path = stem.with_suffix(INDEX_SUFFIX)
        self.time_index_path = stem.with_suffix(TIME_INDEX_SUFFIX)
        self._interval = index_interval_bytes
        self._size = 0
        self._capacity = 0
        self._allocated = 0  # bytes of the .log with blocks: the data and what _reserve took
        self._map: mmap.mmap | None = None
        self._writable = False
        self._fd: int | None = None  # kept while active and until synced
        self._offset_index: OffsetIndex | None = None
        self._time_index: TimeIndex | None = None
        self._next_offset: int | None = None
        self._first_time: int | None = None
        self._last_time: int | None = None
        self._last_entry_position: int | None = None
        #: Sealed: the offset after the segment's last record (the next segment's base).
        self._end_offset: int | None = None
        self._damaged: dict[int, DamagedRange] = {}  # by position where the damage starts
        #: The damaged range the segment's data ends with, if any (its newest time is then
        #: not known: ``last_append_time_ms`` is that of the last good frame).
        self.tail_damage: DamagedRange | None = None
        #: Rebuilt from the log in this process: an entry that disagrees with the log is
        #: then damage in the log, not a garbled index.
        self._index_trusted = False

    # -- opening and state changes -------------------------------------------------

    @classmethod
    def create(cls, directory: Path, base_offset: int, *, capacity_bytes: int,
               index_interval_bytes: int) -> Segment:
        """A new, empty, active segment preallocated to ``capacity_bytes``."""
        seg = cls(directory, base_offset, index_interval_bytes=index_interval_bytes)
        for stale in (seg.index_path, seg.time_index_path):
            stale.unlink(missing_ok=True)
        seg._fd = os.open(seg.log_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        seg._next_offset = base_offset
        try:
            seg._open_writable(capacity_bytes)
        except BaseException:
            seg.discard()  # leave nothing behind that would block the next attempt
            raise
        return seg

    @classmethod
    def create_empty(cls, directory: Path, base_offset: int, *, index_interval_bytes: int) -> Segment:
        """A new, empty segment that is not active: only its ``.log`` file, which takes
        no blocks (a partition opened on a full disk; ``activate`` it later)."""
        seg = cls(directory, base_offset, index_interval_bytes=index_interval_bytes)
        for stale in (seg.index_path, seg.time_index_path):
            stale.unlink(missing_ok=True)
        os.close(os.open(seg.log_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        return seg

    def discard(self) -> None:
        """Close and remove the files of a segment that never held data."""
        self.close()
        for path in (self.log_path, self.index_path, self.time_index_path):
            path.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path, base_offset: int, *, index_interval_bytes: int) -> Segment:
        """A sealed segment whose ``.log`` holds exactly its data; nothing is mapped yet."""
        seg = cls(directory, base_offset, index_interval_bytes=index_interval_bytes)
        seg._size = os.stat(seg.log_path).st_size
        return seg

    def set_end_offset(self, offset: int) -> None:
        """A sealed segment's end offset: the next segment's base offset."""
        self._end_offset = offset

    def check_tail(self) -> DamagedRange | None:
        """The start-up check of a sealed segment (``damage.check_tail``: a few preads,
        no map): the damaged range its data ends with, if any, remembered for reads."""
        end = self._end_offset
        if end is None or self._writable:
            return None
        if not self._size:
            found = damages.DamagedRange(self.base_offset, end - 1, 0, 0, TRUNCATED) if end > self.base_offset else None
        else:
            check = damages.check_tail(self.log_path, self.index_path, size=self._size, base_offset=self.base_offset,
                                       end_offset=end)
            found = check.damage
        if found is not None:
            self._damaged[found.position] = found
            if found.resume_position >= self._size:
                self.tail_damage = found
        return found

    def check_end(self) -> DamagedRange | None:
        """For a loaded segment whose end offset is set (the partition's last one, at
        start-up): the damaged range its data ends with, if any (the frames from the
        last index entry walked, the last one's CRC checked); the segment is then not
        made active."""
        if self._writable or self._end_offset is None:
            return None
        self._load_tail()
        return self.tail_damage

    def check_size(self) -> DamagedRange | None:
        """Whether a sealed segment's file was cut short under the running broker (one
        ``stat``; ``PartitionLog`` calls it once per segment a read or a time lookup
        touches): then the data ends where the file now ends, nothing is read through
        the map past it (that would be SIGBUS), and the damaged range the data now ends
        with is returned (found with a few preads, ``check_tail``). A file cut between
        this check and the read still faults: files are not to be truncated under a
        running broker (README)."""
        if self._writable or not self._size:
            return None
        try:
            size = os.stat(self.log_path).st_size
        except FileNotFoundError:  # removed: a map still reads the old file
            if self._map is not None:
                return None
            size = 0
        if size >= self._size:
            return None
        self._shrunk(size)
        return self.check_tail()

    def _shrunk(self, size: int) -> None:
        """The file now holds only ``size`` bytes: forget everything past them (the
        index entries there are found stale by ``_lookup``, which rebuilds the index)."""
        log.warning("%s was cut to %d bytes (it held %d) under the running broker; the offsets it "
                    "no longer holds are reported as damaged", self.log_path, size, self._size)
        self._unmap()
        self._size = self._capacity = size
        self._damaged = {p: d for p, d in self._damaged.items() if d.resume_position <= size}
        self.tail_damage = None
        self._index_trusted = False
        self._next_offset = None  # the newest append time is found again (``_load_tail``)
        if not size:
            self._first_time = None

    def damage_found(self) -> list[DamagedRange]:
        """The damaged ranges found so far (at start-up and by reads), by position."""
        return [self._damaged[p] for p in sorted(self._damaged)]

    def activate(self, capacity_bytes: int) -> None:
        """Make a loaded segment the active one: preallocate, map writable, find the
        end of its data (damage in it is found by the walks, as in a sealed segment). If
        the indexes cannot be preallocated (OSError, e.g. ENOSPC) the segment is left
        loaded, not active, as it was: readable, and ``activate`` can be tried again."""
        self._unmap()
        self._close_indexes()
        if self._fd is None:
            self._fd = os.open(self.log_path, os.O_RDWR)
        try:
            self._open_writable(max(capacity_bytes, self._size))
        except BaseException:
            self._unmap()
            self._close_indexes()
            self._writable = False
            self._capacity = self._size
            os.ftruncate(self._fd, self._size)  # back to exactly its data, as loaded
            os.close(self._fd)
            self._fd = None
            raise
        self._load_tail()
        self._end_offset = None  # from here on the end is the next offset (``_end``)

    def _open_writable(self, capacity: int) -> None:
        assert self._fd is not None
        if os.fstat(self._fd).st_size < capacity:
            os.ftruncate(self._fd, capacity)
        self._capacity = capacity
        self._allocated = self._size
        self._map = mmap.mmap(self._fd, capacity, access=mmap.ACCESS_WRITE)
        self._writable = True
        entries = index_capacity(capacity, self._interval)
        self._offset_index = OffsetIndex(self.index_path, self.base_offset, capacity=entries,
                                         data_size=self._size)
        self._time_index = TimeIndex(self.time_index_path, self.base_offset, capacity=entries,
                                     data_size=self._size)
        self._check_indexes()

    def seal(self) -> None:
        """Trim the log and indexes to their real sizes; later reads map them read-only."""
        if not self._writable:
            return
        self._unmap()
        assert self._fd is not None and self._offset_index is not None and self._time_index is not None
        os.ftruncate(self._fd, self._size)
        self._offset_index.trim()
        self._time_index.trim()
        self._writable = False
        self._capacity = self._size

    def sync_fds(self) -> list[int]:
        """Duplicates of the open descriptors with unsynced writes (caller fsyncs and
        closes them); duplicates stay valid even if the segment is closed meanwhile.
        Index files come only if their entries changed since the last call; if a
        duplicate cannot be made (EMFILE) none is returned and the indexes stay due."""
        fds: list[int] = []
        try:
            if self._fd is not None:
                fds.append(os.dup(self._fd))
            for index in (self._offset_index, self._time_index):
                fd = index.sync_fd() if index is not None else None
                if fd is not None:
                    fds.append(fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.mark_unsynced()
            raise
        return fds

    def mark_unsynced(self) -> None:
        """Its indexes are due for the next ``sync_fds`` again (the flush that took
        their descriptors did not happen)."""
        for index in (self._offset_index, self._time_index):
            if index is not None:
                index.mark_unsynced()

    def release_fds(self) -> None:
        """Close a sealed segment's descriptors once its writes are synced."""
        if self._writable:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for index in (self._offset_index, self._time_index):
            if index is not None:
                index.release_fd()

    def close(self) -> None:
        self._unmap()
        self._close_indexes()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._writable = False

    def delete(self) -> list[Path]:
        """Close and rename the files to ``*.deleted`` (log first, so a crash leaves no
        index without its log); returns the renamed paths for the caller to unlink."""
        self.close()
        renamed = []
        for path in (self.log_path, self.index_path, self.time_index_path):
            target = path.with_name(path.name + DELETED_SUFFIX)
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue
            renamed.append(target)
        return renamed

    # -- properties ----------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of data (frames) in the log."""
        return self._size

    @property
    def is_active(self) -> bool:
        return self._writable

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def next_offset(self) -> int:
        """The offset after the last batch (``base_offset`` when empty)."""
        if self._next_offset is None:
            self._load_tail()
        assert self._next_offset is not None
        return self._next_offset

    @property
    def first_append_time_ms(self) -> int | None:
        """Append time of the first batch; None when empty."""
        if self._first_time is None and self._size:
            buf = self._ensure_map()
            header = read_header(buf, 0, self._size)
            if header is None or header.base_offset != self.base_offset:
                return None  # a damaged first batch: not known (reads report the damage)
            self._first_time = header.append_time_ms
        return self._first_time

    @property
    def last_append_time_ms(self) -> int | None:
        """Append time of the last batch (the newest); None when empty."""
        if self._next_offset is None:
            self._load_tail()
        return self._last_time

    # -- append and read -------------------------------------------------------------

    def append(self, frame: bytes, *, base_offset: int, append_time_ms: int, record_count: int) -> int:
        """Copy ``frame`` to the end of the data and index it if due; its position.
        ``append_frames`` of one, written out: this is the hot path."""
        position = self._size
        end = position + len(frame)
        if not self._writable or end > self._capacity:
            raise StorageError(f"segment {self.log_path} cannot take {len(frame)} more bytes")
        assert self._fd is not None and self._offset_index is not None and self._time_index is not None
        if end > self._allocated:
            self._reserve(end)
        written = os.pwrite(self._fd, frame, position)  # see append_frames
        if written != len(frame):
            self._write_rest(frame, position, written)
        if index_due(self._last_entry_position, position, self._interval):
            if self._offset_index.append(base_offset, position):
                self._time_index.append(append_time_ms, base_offset)
                self._last_entry_position = position
        if self._first_time is None:
            self._first_time = append_time_ms
        self._last_time = append_time_ms
        self._next_offset = base_offset + record_count
        self._size = end
        return position

    def append_frames(self, frames: Sequence[tuple[bytes, int, int]], size: int, *, append_time_ms: int) -> int:
        """Copy consecutive ``frames`` (frame, base offset, record count; ``size`` bytes
        in all) to the end of the data, all or none, and index them where due; the
        position of the first. An OSError (ENOSPC: no room) leaves the segment as it
        was (module docstring)."""
        position = self._size
        end = position + size
        if not self._writable or end > self._capacity:
            raise StorageError(f"segment {self.log_path} cannot take {size} more bytes")
        assert self._fd is not None and self._offset_index is not None and self._time_index is not None
        if end > self._allocated:
            self._reserve(end)
        data = frames[0][0] if len(frames) == 1 else b"".join(frame for frame, _, _ in frames)
        # pwrite, not a store into the map: a full disk is then an OSError (ENOSPC)
        # instead of SIGBUS, and no page faults are taken on the write path. The map
        # shares the page cache, so readers see the bytes at once.
        written = os.pwrite(self._fd, data, position)  # an error here: nothing was written
        if written != size:
            self._write_rest(data, position, written)
        at = position
        for frame, base_offset, _ in frames:
            if index_due(self._last_entry_position, at, self._interval):
                if self._offset_index.append(base_offset, at):
                    self._time_index.append(append_time_ms, base_offset)
                    self._last_entry_position = at
            at += len(frame)
        if self._first_time is None:
            self._first_time = append_time_ms
        self._last_time = append_time_ms
        self._next_offset = frames[-1][1] + frames[-1][2]
        self._size = end
        return position

    def _reserve(self, end: int) -> None:
        """Give the log's bytes below ``end`` real blocks before they are written: a
        whole chunk ahead if it fits, else just what is needed. OSError (ENOSPC) if
        not even that fits; nothing is written here."""
        assert self._fd is not None
        ahead = min(max(end, self._allocated + RESERVE_CHUNK_BYTES), self._capacity)
        for target in dict.fromkeys((ahead, end)):
            try:
                os.posix_fallocate(self._fd, self._allocated, target - self._allocated)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._allocated = self._capacity  # cannot preallocate here: _write undoes a failed write
                    return
                if not is_disk_full(exc) or target == end:
                    raise
                continue
            self._allocated = target
            return

    def _write_rest(self, data: bytes, position: int, written: int) -> None:
        """After a short pwrite of ``data`` at ``position``: write the rest, or, when
        that fails too (ENOSPC), zero what was written and raise: nothing
        half-appended stays in the file."""
        assert self._fd is not None
        try:
            with memoryview(data) as view:
                while written < len(data):
                    n = os.pwrite(self._fd, view[written:], position + written)
                    if n <= 0:
                        raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
                    written += n
        except BaseException:
            self._zero(position, position + written)
            raise

    def _zero(self, start: int, end: int) -> None:
        """Write zeros over ``[start, end)`` (bytes written before, so no block is needed)."""
        assert self._fd is not None
        while start < end:
            n = os.pwrite(self._fd, _ZEROS[: min(len(_ZEROS), end - start)], start)
            if n <= 0:
                raise OSError(errno.EIO, f"could not zero {self.log_path} at {start}")
            start += n

    def truncate_to(self, offset: int) -> None:
        """Drop the batches at or after ``offset`` from an active segment (undoing the
        appends of a request that failed part-way): their bytes are zeroed, their
        index entries dropped. ``offset`` must be where a batch starts."""
        if not self._writable:
            raise StorageError(f"segment {self.log_path} is not active")
        assert self._offset_index is not None and self._time_index is not None
        if offset >= self.next_offset:
            return
        position, last_time = 0, None
        if offset > self.base_offset:
            expected, start = self._offset_index.lookup(offset - 1)
            previous = None
            for header in self._walk(start, expected):
                if isinstance(header, DamagedRange) or header.base_offset >= offset:
                    break
                previous = header
            if previous is None or previous.next_offset != offset:
                raise StorageError(f"no batch of {self.log_path} starts at offset {offset}")
            position, last_time = previous.end, previous.append_time_ms
        self._zero(position, self._size)
        # Damage remembered in what is dropped no longer exists (new data comes there).
        self._damaged = {p: d for p, d in self._damaged.items() if d.resume_position <= position}
        self._offset_index.truncate_to_position(position)
        self._time_index.truncate_to_offset(offset)
        self._last_entry_position = self._offset_index.last_position()
        self._size, self._next_offset, self._last_time = position, offset, last_time
        if not position:
            self._first_time = None

    def fits(self, frame_size: int) -> bool:
        return self._writable and self._size + frame_size <= self._capacity

    def grow(self, capacity_bytes: int) -> None:
        """Enlarge an active segment's preallocation (for a frame bigger than
        segment_bytes arriving at an empty segment). Safe: no view of the map is kept."""
        if not self._writable or capacity_bytes <= self._capacity:
            return
        assert self._fd is not None
        self._unmap()
        os.ftruncate(self._fd, capacity_bytes)
        self._map = mmap.mmap(self._fd, capacity_bytes, access=mmap.ACCESS_WRITE)
        self._capacity = capacity_bytes

    def find_position(self, offset: int) -> int:
        """Byte position of the frame containing ``offset`` (``size`` if past the end).
        CorruptRecords if ``offset`` lies in a damaged range."""
        self._ensure_indexes()
        expected, position = self._lookup(offset)
        for item in self._walk(position, expected):
            if isinstance(item, DamagedRange):
                if offset <= item.last_offset:
                    raise CorruptRecords(item.first_offset, item.last_offset, item.cause)
                continue
            if item.next_offset > offset:
                return item.position
        return self._size

    def read(self, position: int, limits: ReadLimits, *, taken_bytes: int, taken_records: int,
             end_offset: int | None = None) -> SegmentRead:
        """Whole frames from ``position`` (a frame start, from ``find_position`` or 0):
        the first one if nothing is taken yet, then more while the running totals stay
        within ``limits``, up to the first damaged stretch and never a frame whose base
        offset is at or past ``end_offset`` (None: no such bound)."""
        max_bytes, max_records = limits.max_bytes, limits.max_records
        bound = _NO_BOUND if end_offset is None else end_offset
        end, records, next_offset = position, 0, self.base_offset
        taken: list[FrameHeader] = []
        stop = None
        for item in self._walk(position, self._offset_at(position)):
            if isinstance(item, DamagedRange):
                stop = item
                break
            if item.base_offset >= bound:
                break
            total_bytes = taken_bytes + end - position
            if (total_bytes or taken_records or taken) and not (
                total_bytes + item.size <= max_bytes and taken_records + records < max_records
            ):
                break
            end = item.end
            taken.append(item)
            records += item.record_count
            next_offset = item.next_offset
        data = self._map[position:end] if end > position and self._map is not None else b""
        # Never serve a batch that no longer matches its checksum (bit rot, a torn
        # page): the copy is checked, so what is verified is what is sent. The good
        # frames before it still go out.
        for k, header in enumerate(taken):
            if not crc_ok(data, header._replace(position=header.position - position)):
                stop = self.damage_at(header.position, header.base_offset, CHECKSUM)
                data, taken = data[: header.position - position], taken[:k]
                records = sum(h.record_count for h in taken)
                next_offset = taken[-1].next_offset if taken else self.base_offset
                break
        return SegmentRead(data, len(taken), records, next_offset, stop)

    def find_time(self, timestamp_ms: int) -> int | None:
        """Base offset of the first batch appended at or after ``timestamp_ms``; None
        if every batch here is older. CorruptRecords if the answer may lie in a
        damaged range (its append times are not known)."""
        found, pending = self.time_lookup(timestamp_ms)
        if found is None and pending is not None:
            raise CorruptRecords(pending.first_offset, pending.last_offset, pending.cause)
        return found

    def time_lookup(self, timestamp_ms: int,
                    pending: DamagedRange | None = None) -> tuple[int | None, DamagedRange | None]:
        """(``find_time``'s answer or None, a damaged range at the end of the walk that
        may hold the answer). ``pending``: such a range just before this segment (the
        previous segment's tail); a batch here older than ``timestamp_ms`` clears it
        (append times never decrease), the first batch here being the answer makes
        the answer ambiguous: CorruptRecords."""
        self._ensure_indexes()
        assert self._time_index is not None
        expected, position = self._lookup(self._time_index.lookup(timestamp_ms))
        answer = self._time_walk(position, expected, timestamp_ms, None if position else pending)
        if answer is None:  # the index said the batch there is older, its header says not
            answer = self._time_walk(0, self.base_offset, timestamp_ms, pending)
        assert answer is not None
        return answer

    def _time_walk(self, position: int, expected: int, timestamp_ms: int,
                   pending: DamagedRange | None) -> tuple[int | None, DamagedRange | None] | None:
        """Walk from an indexed batch older than ``timestamp_ms`` (or the start); None if
        the one at ``position`` > 0 is not older (an index that disagrees with the log)."""
        first = True
        # Every batch walked must match its checksum (about one index interval of bytes
        # is checked): the times of the one returned and of the one before it decide
        # the answer, and a damaged batch's time is not known.
        for item in self._walk(position, expected, check=_always):
            if isinstance(item, DamagedRange):
                pending, first = item, False
                continue
            if item.append_time_ms >= timestamp_ms:
                if first and position:
                    return None
                if pending is not None:
                    raise CorruptRecords(pending.first_offset, pending.last_offset, pending.cause)
                return item.base_offset, None
            pending, first = None, False
        return None, pending

    # -- damage ------------------------------------------------------------------------

    def _walk(self, position: int, expected: int, *,
              check: Callable[[FrameHeader], bool] | None = None) -> Iterator[FrameHeader | DamagedRange]:
        """From the frame at ``position`` (which must start at offset ``expected``) to
        the end of the data: the header of each frame that continues the offsets (and,
        where ``check(header)`` is true, matches its CRC), and a ``DamagedRange`` for
        each stretch that does not, after which the walk goes on where frames resume.
        Ends with the range of missing offsets if the data ends before the end offset.

        A header is yielded only once the next frame (or the end offset) agrees with
        its length and record count, or its CRC vouches for them: a flipped count or
        length would otherwise pass as good and blame the intact frame after it."""
        buf = self._ensure_map()
        limit, end = self._size, self._end()
        header = read_header(buf, position, limit) if position < limit else None
        while position < limit:
            if header is not None and header.base_offset == expected and (
                    check is None or not check(header) or crc_ok(buf, header)):
                after = header.end
                following = read_header(buf, after, limit) if after < limit else None
                if (following.base_offset == header.next_offset if following is not None
                        else after == limit and (end is None or header.next_offset == end)) \
                        or crc_ok(buf, header):
                    yield header
                    position, expected, header = after, header.next_offset, following
                    continue
                cause = CHECKSUM
            else:
                cause = CHECKSUM if header is not None and header.base_offset == expected else HEADER
            found = self.damage_at(position, expected, cause)
            if found is None:  # bytes after the last frame that hold no offset
                return
            yield found
            position, expected = found.resume_position, found.next_offset
            header = read_header(buf, position, limit) if position < limit else None
        if end is not None and expected < end:
            found = self.damage_at(position, expected, TRUNCATED)
            if found is not None:
                yield found

    def damage_at(self, position: int, expected: int, cause: str) -> DamagedRange | None:
        """The damaged range starting at ``position`` (see ``segments.damage.locate``)."""
        known = self._damaged.get(position)
        if known is not None and known.first_offset == expected:
            return known
        buf = self._ensure_map()
        index = self._offset_index
        end = self._end()
        found = damages.locate(buf, position, expected, limit=self._size, end_offset=end,
                               next_entry=index.entry_after(position) if index is not None else None, cause=cause)
        if found is not None and end is not None:  # with the end unknown the extent is a guess
            self._damaged[position] = found
        return found

    def _end(self) -> int | None:
        return self._next_offset if self._writable else self._end_offset

    def _offset_at(self, position: int) -> int:
        """The base offset of the frame at ``position`` (a frame start a lookup found)."""
        if position == 0 or position >= self._size:
            return self.base_offset
        buf = self._ensure_map()
        header = read_header(buf, position, self._size)
        if header is None:
            raise CorruptBatch(self.log_path, position, "read from a position where no frame starts")
        return header.base_offset

    def _lookup(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the index entry to walk from for ``offset``. An entry
        whose frame names another offset means a garbled index (rebuilt once), or,
        once rebuilt, damage in the log (the walk reports it)."""
        assert self._offset_index is not None
        expected, position = self._offset_index.lookup(offset)
        if position and not self._index_trusted:
            buf = self._ensure_map()
            header = read_header(buf, position, self._size)
            if header is None or header.base_offset != expected:
                self.rebuild_indexes(f"the entry for offset {expected} points at byte {position}, "
                                     "where no frame of that offset starts")
                expected, position = self._offset_index.lookup(offset)
        return expected, position

    def _ensure_map(self) -> FrameBuffer:
        """The file's data mapped (read-only if not mapped yet); empty when it has none."""
        if self._map is None and self._size:
            fd = os.open(self.log_path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if size < self._size:  # cut short since it was loaded: map only what is there
                    self._shrunk(size)
                if self._size:
                    self._map = mmap.mmap(fd, self._size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        return self._map if self._map is not None else b""

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _ensure_indexes(self) -> None:
        if self._offset_index is None:
            self._offset_index = OffsetIndex(self.index_path, self.base_offset, capacity=None,
                                             data_size=self._size)
            self._time_index = TimeIndex(self.time_index_path, self.base_offset, capacity=None,
                                         data_size=self._size)
            self._check_indexes()

    def _close_indexes(self) -> None:
        for index in (self._offset_index, self._time_index):
            if index is not None:
                index.close()
        self._offset_index = self._time_index = None

    def _check_indexes(self) -> None:
        """Validate the loaded indexes (cheap checks) and rebuild them if they fail."""
        assert self._offset_index is not None and self._time_index is not None
        offsets, times = self._offset_index.entries(), self._time_index.entries()
        reason = None
        if not (self._offset_index.file_ok and self._time_index.file_ok):
            reason = "missing or not a whole number of entries"
        reason = reason or check_entries(offsets, times, self._size) or self._spot_check(offsets, times)
        if reason is None:
            self._last_entry_position = self._offset_index.last_position()
            return
        self.rebuild_indexes(reason)

    def rebuild_indexes(self, reason: str) -> None:
        """Recompute both indexes from the log (they are caches of it). Raises
        CorruptBatch if the log itself does not parse."""
        assert self._offset_index is not None and self._time_index is not None
        log.warning("rebuilding indexes of %s: %s", self.log_path, reason)
        self._ensure_map()
        # Damaged stretches get no entry; entry 0 stays (0, 0), the walks' start.
        headers = [h for h in self._walk(0, self.base_offset) if not isinstance(h, DamagedRange)]
        offsets, times = build_index_entries(iter(headers), self.base_offset, self._interval)
        if self._size and (not headers or headers[0].position):
            offsets = np.concatenate([np.array([(0, 0)], dtype=offsets.dtype), offsets])
            first_time = headers[0].append_time_ms if headers else 0
            times = np.concatenate([np.array([(first_time, 0, 0)], dtype=times.dtype), times])
        self._offset_index.replace(offsets)
        self._time_index.replace(times)
        self._last_entry_position = self._offset_index.last_position()
        self._index_trusted = True

    def _spot_check(self, offsets: np.ndarray, times: np.ndarray) -> str | None:
        """Whether the last entry points at the frame it claims (one header read)."""
        if not len(offsets):
            return None
        buf = self._ensure_map()
        position = int(offsets[-1]["position"])
        header = read_header(buf, position, self._size)
        if header is None:
            return f"no frame at indexed position {position}"
        if header.base_offset != self.base_offset + int(offsets[-1]["relative_offset"]):
            return f"frame at position {position} has another offset"
        if header.append_time_ms != int(times[-1]["timestamp_ms"]):
            return f"frame at position {position} has another append time"
        return None

    def _load_tail(self) -> None:
        """Find the last batch (next offset, newest append time) from the last entry.
        The newest time is that of the last frame that matches its checksum, found
        from the segment's start if none after the last entry does (a damaged tail);
        None if no frame does (then time lookups treat the segment as unknown)."""
        self._ensure_indexes()
        assert self._offset_index is not None
        start = self._lookup(self.base_offset + MAX_RELATIVE_OFFSET)
        good: list[FrameHeader] = []
        last: FrameHeader | DamagedRange | None = None
        for expected, position in (start, (self.base_offset, 0)):
            good, last = [], None
            for last in self._walk(position, expected):
                if isinstance(last, DamagedRange):
                    good = []
                else:
                    good.append(last)
            if position == start[1]:
                walked_to = last.next_offset if last is not None else self.base_offset
                self._next_offset = walked_to if self._writable or self._end_offset is None else self._end_offset
                self.tail_damage = last if isinstance(last, DamagedRange) else None
            while good and not crc_ok(self._ensure_map(), good[-1]):
                found = self.damage_at(good[-1].position, good[-1].base_offset, CHECKSUM)
                if position == start[1]:
                    self.tail_damage = found
                good.pop()
            if good or not position:
                break
        self._last_time = good[-1].append_time_ms if good else None
