"""The sparse offset and time indexes of one segment: disposable caches over its log.

On-disk formats (little-endian arrays of fixed-size entries, no header)::

    <base>.index      OFFSET_ENTRY  relative_offset: uint32, position: uint32          8 bytes
    <base>.timeindex  TIME_ENTRY    timestamp_ms: int64, relative_offset: uint32, pad  16 bytes

``relative_offset`` is a batch's base offset minus the segment's base offset, ``position``
its byte position in the ``.log`` file and ``timestamp_ms`` its append time.

Invariants of the used entries (both files get an entry for the same batches, chosen by
``index_due``: the first batch of a segment, then a batch once at least
``index_interval_bytes`` were written since the last entry):

- entry 0 is for the segment's first batch: relative offset 0, position 0;
- relative offsets and positions strictly increase; timestamps never decrease
  (append times are monotonic), so lookups are a ``numpy.searchsorted``;
- unused entries of a preallocated file are zeros. Entry 0 may itself be all zeros,
  so the used count is found by a binary search on ``relative_offset != 0`` for
  entries 1.. (``used_entries``).

A writable index (the active segment's) is a ``numpy.memmap`` preallocated to a
capacity and trimmed to its used entries by ``trim``; a read-only index maps the
trimmed file. Entries past the capacity are skipped: a sparser index is still correct.
Indexes are caches: ``check_entries`` finds garbled ones and the segment rebuilds them
from the log. A rebuilt read-only index that cannot be saved (a full disk) is kept in
memory and its file left as it was (invalid or missing): the next load rebuilds it
again. Not thread-safe: the owning ``PartitionLog`` serializes access.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from .batch import HEADER_SIZE
from .checkpoint import write_atomic
from .errors import is_disk_full

log = logging.getLogger(__name__)

OFFSET_ENTRY = np.dtype([("relative_offset", "<u4"), ("position", "<u4")])
TIME_ENTRY = np.dtype([("timestamp_ms", "<i8"), ("relative_offset", "<u4"), ("pad", "<u4")])
MAX_INDEX_BYTES = 10 * 1024 * 1024  # per index file, before trimming
MAX_RELATIVE_OFFSET = (1 << 32) - 1
MAX_POSITION = (1 << 32) - 1


def index_capacity(segment_capacity_bytes: int, index_interval_bytes: int) -> int:
    """Entries to preallocate so a full segment never runs out (capped by size)."""
    step = max(index_interval_bytes, HEADER_SIZE)  # two entries are at least this far apart
    return max(2, min(segment_capacity_bytes // step + 2, MAX_INDEX_BYTES // TIME_ENTRY.itemsize))


def index_due(last_entry_position: int | None, position: int, index_interval_bytes: int) -> bool:
    """Whether the batch at ``position`` gets an index entry (the sparse schedule)."""
    return last_entry_position is None or position - last_entry_position >= index_interval_bytes


def used_entries(relative_offsets: np.ndarray, *, has_data: bool) -> int:
    """The count of used entries of a possibly preallocated index (see module docstring)."""
    n = len(relative_offsets)
    lo, hi = 1, n  # first i >= 1 with relative_offset == 0
    while lo < hi:
        mid = (lo + hi) // 2
        if relative_offsets[mid] != 0:
            lo = mid + 1
        else:
            hi = mid
    if n == 0:
        return 0
    return lo if lo > 1 else int(has_data)


def check_entries(offsets: np.ndarray, times: np.ndarray, data_size: int) -> str | None:
    """Why the used entries of a segment's two indexes are not valid for a log of
    ``data_size`` bytes, or None if they are (cheap, vectorized checks)."""
    if data_size == 0:
        return None if len(offsets) == 0 and len(times) == 0 else "entries for an empty log"
    if len(offsets) == 0:
        return "no entries"
    if len(times) != len(offsets):
        return f"{len(offsets)} offset entries but {len(times)} time entries"
    rel, pos = offsets["relative_offset"], offsets["position"]
    if rel[0] != 0 or pos[0] != 0:
        return "first entry is not (0, 0)"
    if np.any(rel[1:] <= rel[:-1]) or np.any(pos[1:] <= pos[:-1]):
        return "entries are not strictly increasing"
    if int(pos[-1]) >= data_size:
        return f"position {int(pos[-1])} is beyond the log's {data_size} bytes"
    if not np.array_equal(times["relative_offset"], rel):
        return "time index offsets differ from the offset index"
    ts = times["timestamp_ms"]
    if np.any(ts[1:] < ts[:-1]):
        return "timestamps decrease"
    return None


class _Index:
    """A memory-mapped array of fixed-size entries; subclasses name the fields."""

    ENTRY: ClassVar[np.dtype]

    def __init__(self, path: Path, base_offset: int, *, capacity: int | None, data_size: int) -> None:
        """Map ``path``: read-only if ``capacity`` is None (a trimmed, sealed index),
        else writable with room for at least ``capacity`` entries. A missing file
        reads as empty (read-only) or is created (writable)."""
        self.path = Path(path)
        self.base_offset = base_offset
        self._fd: int | None = None
        self._array: np.ndarray
        self._writable = capacity is not None
        #: Entries changed since ``sync_fd`` last handed the file out: a clean index
        #: is not fsynced again (an fsync of an unchanged file still costs ~0.1 ms).
        #: True when opened writable: what an earlier run left may be unsynced.
        self._unsynced = self._writable
        esize = self.ENTRY.itemsize
        if capacity is None:
            try:
                file_size = os.stat(self.path).st_size
            except FileNotFoundError:
                file_size = -1
            self._map_read_only(max(file_size, 0) // esize)
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                file_size = os.fstat(self._fd).st_size
                length = max(capacity, file_size // esize)
                if file_size != length * esize:
                    _allocate(self._fd, length * esize)
                self._array = np.memmap(self.path, dtype=self.ENTRY, mode="r+", shape=(length,))
            except BaseException:  # e.g. ENOSPC preallocating: no descriptor left behind
                os.close(self._fd)
                self._fd = None
                raise
        #: False if the file was missing or not a whole number of entries.
        self.file_ok = file_size >= 0 and file_size % esize == 0
        self.count = used_entries(self._array["relative_offset"], has_data=data_size > 0)

    def _map_read_only(self, length: int) -> None:
        if length:
            self._array = np.memmap(self.path, dtype=self.ENTRY, mode="r", shape=(length,))
        else:
            self._array = np.zeros(0, dtype=self.ENTRY)

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def full(self) -> bool:
        return self.count >= len(self._array)

    def entries(self) -> np.ndarray:
        """A copy of the used entries."""
        return np.array(self._array[: self.count])

    def truncate(self, count: int) -> None:
        """Drop the entries from ``count`` on (writable only)."""
        if count < self.count:
            self._array[count : self.count] = np.zeros(self.count - count, dtype=self.ENTRY)
            self.count = count
            self._unsynced = True

    def replace(self, entries: np.ndarray) -> None:
        """Make ``entries`` the used entries (a rebuild). A read-only index rewrites
        its file atomically and maps it again."""
        if self.writable:
            self.truncate(0)
            n = min(len(entries), len(self._array))
            self._array[:n] = entries[:n]
            self.count = n
            self._unsynced = True
        else:
            self._unmap()
            try:
                self.write_file(self.path, entries)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                log.warning("no space to save the rebuilt index %s; serving it from memory", self.path.name)
                self._array = np.array(entries, dtype=self.ENTRY)
            else:
                self._map_read_only(len(entries))
            self.count = len(entries)

    @classmethod
    def write_file(cls, path: Path, entries: np.ndarray) -> None:
        """Write a trimmed index file holding exactly ``entries``."""
        write_atomic(path, np.asarray(entries, dtype=cls.ENTRY).tobytes())

    def trim(self) -> None:
        """Cut a writable index's file to its used entries and map it read-only.
        The file descriptor stays open for ``sync_fd`` until ``release_fd``."""
        if not self.writable:
            return
        self._unmap()
        assert self._fd is not None
        os.ftruncate(self._fd, self.count * self.ENTRY.itemsize)
        self._writable = False
        self._unsynced = True
        self._map_read_only(self.count)

    def sync_fd(self) -> int | None:
        """A duplicate descriptor of the file to fsync (caller closes it), if still
        open and changed since the last one was handed out (None: nothing to sync).
        The caller fsyncs it or fails the log: a failed fsync is never retried."""
        if self._fd is None or not self._unsynced:
            return None
        fd = os.dup(self._fd)
        self._unsynced = False
        return fd

    def mark_unsynced(self) -> None:
        """Due for the next ``sync_fd`` again (the flush that took it did not happen)."""
        self._unsynced = True

    def release_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _unmap(self) -> None:
        mm = getattr(self._array, "_mmap", None)
        self._array = np.zeros(0, dtype=self.ENTRY)
        if mm is not None:
            mm.close()

    def close(self) -> None:
        self._unmap()
        self.count = 0
        self.release_fd()

    def __len__(self) -> int:
        return self.count


class OffsetIndex(_Index):
    """Relative offset -> byte position of the batch starting there (sparse)."""

    ENTRY = OFFSET_ENTRY

    def append(self, offset: int, position: int) -> bool:
        """Add an entry for the batch with base ``offset`` at ``position``; False if full."""
        if self.full:
            return False
        self._array[self.count] = (offset - self.base_offset, position)
        self.count += 1
        self._unsynced = True
        return True

    def lookup(self, offset: int) -> tuple[int, int]:
        """(base offset, position) of the last indexed batch starting at or before
        ``offset``; the segment start if there is none."""
        rel = self._array["relative_offset"][: self.count]
        i = int(np.searchsorted(rel, offset - self.base_offset, side="right")) - 1
        if i < 0:
            return self.base_offset, 0
        entry = self._array[i]
        return self.base_offset + int(entry["relative_offset"]), int(entry["position"])

    def last_position(self) -> int | None:
        return int(self._array[self.count - 1]["position"]) if self.count else None

    def entry_after(self, position: int) -> tuple[int, int] | None:
        """(base offset, position) of the first entry after byte ``position``, if any
        (where a scan past damage at ``position`` may stop)."""
        pos = self._array["position"][: self.count]
        i = int(np.searchsorted(pos, position, side="right"))
        if i >= self.count:
            return None
        entry = self._array[i]
        return self.base_offset + int(entry["relative_offset"]), int(entry["position"])

    def truncate_to_position(self, position: int) -> None:
        """Drop the entries at or after byte ``position`` (writable only)."""
        pos = self._array["position"][: self.count]
        self.truncate(int(np.searchsorted(pos, position, side="left")))


class TimeIndex(_Index):
    """Append time -> relative offset of the batch appended then (sparse)."""

    ENTRY = TIME_ENTRY

    def append(self, timestamp_ms: int, offset: int) -> bool:
        """Add an entry for the batch with base ``offset``; False if full."""
        if self.full:
            return False
        self._array[self.count] = (timestamp_ms, offset - self.base_offset, 0)
        self.count += 1
        self._unsynced = True
        return True

    def lookup(self, timestamp_ms: int) -> int:
        """The base offset of the last indexed batch appended before ``timestamp_ms``
        (where a scan for the first batch at or after it starts); the segment's base
        offset if there is none."""
        ts = self._array["timestamp_ms"][: self.count]
        i = int(np.searchsorted(ts, timestamp_ms, side="left")) - 1
        if i < 0:
            return self.base_offset
        return self.base_offset + int(self._array[i]["relative_offset"])

    def truncate_to_offset(self, offset: int) -> None:
        """Drop the entries for batches at or after ``offset`` (writable only)."""
        rel = self._array["relative_offset"][: self.count]
        self.truncate(int(np.searchsorted(rel, offset - self.base_offset, side="left")))


def _allocate(fd: int, size: int) -> None:
    """Size the file with real blocks: stores through the memmap can then never hit an
    unallocated page on a full disk (SIGBUS); the shortage is ENOSPC here instead."""
    current = os.fstat(fd).st_size
    if size < current:
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # the filesystem cannot preallocate; sparse it is
