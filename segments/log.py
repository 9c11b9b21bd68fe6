"""PartitionLog: one partition's append-only log of record batches.

A directory of segments (``segment.py``) named by base offset, plus ``partition.json``
and the ``clean-shutdown`` marker (``recovery.py``). Offsets are dense: a batch of n
records appended at ``log_end_offset`` = L gets offsets L .. L+n-1. The last segment is
the active one; earlier segments are sealed and immutable until retention deletes them
(oldest first, never the active one; ``log_start_offset`` is the first segment's base
offset and is persisted).

Durability: appends go to the page cache with ``pwrite``. ``flush`` fsyncs every
segment written since the last flush and advances ``flushed_offset`` (everything below
it survives a power loss); ``checkpoint`` persists that point as the recovery point, so
a crash recovery scans only what came after it. Segment files are synced with
``fdatasync`` (``sync_data``): it makes the data and what is needed to read it back
(size, block allocation) durable and skips only timestamps (mtime), which nothing
here reads; that halves the cost of a one-record fsync=always produce on ext4 (the
journal commit of an mtime update). Index files are synced only when their entries
changed since the last flush (``_Index.sync_fd``); directories keep a full fsync.

Full disks. No room is ``DiskFull`` (an OSError, ENOSPC), never SIGBUS, and it leaves
the log as it was: ``append_batches`` stores a request's batches for the partition
all or none (one segment, a roll first if due, blocks reserved for all of them before
the first byte is written: ``segment``), and ``undo_appends`` takes back the batches
of a request that failed later on (another partition). Index files, written through
memmaps, are preallocated with real blocks (``posix_fallocate``). A log opened on a
full disk serves reads; if there is no room to make its last segment active, every
append tries again and answers DiskFull until there is (``writable``). Nothing of
opening needs free space (``recovery``); a ``partition.json`` that cannot be saved is
logged and saved with the next checkpoint.

A failed fsync fails the log (``LogFailed``): never retried, since the kernel may
have dropped the pages or marked them clean. Opening the directory again recovers it
(the owner does, in-process: the broker's repair job).

Damage: a read returns the good frames up to a damaged stretch (``segments.damage``)
and raises ``CorruptRecords`` (its offset range, no file names) when it starts there;
so does a time lookup whose answer may lie in one. It never answers nothing below
the log end. Opening checks the end of every sealed segment against the next one's
base offset (a few preads each: ``damage.check_tail``), so a file cut short is
reported at start-up, and the last segment against the log end recovery vouches for
(``LoadResult.log_end``; if its data ends in damage it stays sealed and a new segment
starts at that end). Reads and time lookups check a sealed segment's file size first
(``Segment.check_size``: a file cut under the running broker is damage, not SIGBUS).
``damaged()`` lists what was found, then and by reads since, and each range is
logged once (with the file and byte position) as it is found.

Time is never read from a clock here: callers pass ``append_time_ms``/``now_ms``.

Thread-safety: every public method may be called from any thread. One lock guards the
structure (segment list, maps, offsets); ``flush`` holds it only to snapshot the work
and fsyncs duplicated descriptors outside it, so an event-loop thread can keep appending
and reading while a worker thread flushes.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from . import recovery
from .batch import MAX_FRAME_BYTES, encode_frame, read_header
from .checkpoint import fsync_directory
from .damage import DamagedRange
from .errors import (
    BatchTooLarge,
    CorruptRecords,
    DiskFull,
    InvalidBatch,
    LogClosed,
    LogFailed,
    OffsetOutOfRange,
    disk_full_as,
    is_disk_full,
)
from .index import MAX_POSITION, MAX_RELATIVE_OFFSET
from .limits import ReadLimits
from .recovery import PartitionState, RecoveryPoint, RecoveryReport
from .segment import Segment

log = logging.getLogger(__name__)

DEFAULT_INDEX_INTERVAL_BYTES = 4096
MAX_RECORD_COUNT = (1 << 32) - 1


class AppendInfo(NamedTuple):
    base_offset: int
    append_time_ms: int
    size: int  # bytes of the stored frame


class ReadResult(NamedTuple):
    data: bytes  # whole frames, back to back
    first_offset: int  # base offset of the first frame (may be below the offset asked for)
    next_offset: int  # the offset after the last frame returned
    batch_count: int
    record_count: int


class LogStats(NamedTuple):
    log_start_offset: int
    log_end_offset: int
    segment_count: int
    size_bytes: int
    oldest_timestamp_ms: int  # append time of the first batch; 0 when empty
    newest_timestamp_ms: int  # append time of the last batch; 0 when empty


class DamagedOffsets(NamedTuple):
    """Offsets ``first_offset .. last_offset`` cannot be read (``cause`` says why)."""

    first_offset: int
    last_offset: int
    cause: str


class DeletedSegment(NamedTuple):
    base_offset: int
    next_offset: int
    size_bytes: int
    newest_timestamp_ms: int
    reason: str  # "retention_ms", "retention_bytes" or "predicate"


class PartitionLog:
    """The log of one partition (see module docstring). Create with ``open``."""

    def __init__(self, directory: Path, segments: list[Segment], *, segment_bytes: int,
                 segment_ms: int, index_interval_bytes: int, name: str,
                 topic: str | None, partition: int | None,
                 report: RecoveryReport | None, log_start_offset: int) -> None:
        self.directory = directory
        self.name = name
        self.topic = topic
        self.partition = partition
        self.recovery = report
        self._segment_bytes = segment_bytes
        self._segment_ms = segment_ms
        self._interval = index_interval_bytes
        self._segments = segments
        self._bases = [s.base_offset for s in segments]
        self._active = segments[-1]
        self._log_end = self._active.next_offset
        self._log_start = min(max(log_start_offset, segments[0].base_offset), self._log_end)
        self._last_time = 0
        for seg in reversed(segments):
            if seg.size:
                self._last_time = seg.last_append_time_ms or 0
                break
        self._flushed = self._log_end
        self._recovery_point = RecoveryPoint(self._active.base_offset, self._active.size, self._log_end)
        self._dirty: set[Segment] = set()
        self._dir_dirty = False
        self._closed = False
        self._failed: LogFailed | None = None
        #: The lowest offset undone (``undo_appends``) since the running flush took
        #: its snapshot: that flush may have synced bytes since zeroed.
        self._undone_to: int | None = None
        #: Where the last append started and the last append time before it, so that
        #: undoing it puts the time back exactly.
        self._last_append: tuple[int, int] = (self._log_end, self._last_time)
        self._lock = threading.Lock()  # structure: segments, maps, offsets
        self._io_lock = threading.Lock()  # one flush/checkpoint/close at a time
        self._reported: set[tuple[int, int]] = set()  # (segment base, position) logged

    @classmethod
    def open(cls, directory: Path | str, *, segment_bytes: int, segment_ms: int,
             index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES, now_ms: int,
             name: str | None = None, topic: str | None = None,
             partition: int | None = None) -> PartitionLog:
        """Open (creating if needed) the log in ``directory``, recovering after a crash.
        ``name`` (default ``topic-partition`` or the directory) is used in messages."""
        if not 0 < segment_bytes <= MAX_POSITION // 2:
            raise ValueError(f"segment_bytes must be in 1..{MAX_POSITION // 2}")
        if segment_ms <= 0 or index_interval_bytes <= 0:
            raise ValueError("segment_ms and index_interval_bytes must be positive")
        directory = Path(directory)
        if name is None:
            name = f"{topic}-{partition}" if topic is not None else str(directory)
        directory.mkdir(parents=True, exist_ok=True)
        loaded = recovery.load(directory, index_interval_bytes=index_interval_bytes, name=name)
        state = loaded.state
        segments = [Segment.load(directory, b, index_interval_bytes=index_interval_bytes)
                    for b in loaded.base_offsets]
        for seg, successor in zip(segments, segments[1:], strict=False):
            seg.set_end_offset(successor.base_offset)
        try:
            if segments and loaded.log_end is not None:
                # The last segment ends at the log end recovery vouches for (never below
                # the recovery point): a header there that fails its CRC cannot move it.
                segments[-1].set_end_offset(loaded.log_end)
            if segments and segments[-1].check_end() is not None:
                # Its data ends in damage: it stays as it is, sealed (reads report the
                # damaged range), and appends go to a new segment at the log end.
                assert loaded.log_end is not None  # check_end needs the end offset set above
                segments.append(_first_segment(directory, loaded.log_end, segment_bytes, index_interval_bytes,
                                               name))
                fsync_directory(directory)
            elif segments:
                _activate(segments[-1], segment_bytes, name)
            else:
                start = max(state.log_start_offset, state.recovery_point.offset
                            if state.recovery_point else 0) if state else 0
                segments.append(_first_segment(directory, start, segment_bytes, index_interval_bytes, name))
                fsync_directory(directory)
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        plog = cls(directory, segments, segment_bytes=segment_bytes, segment_ms=segment_ms,
                   index_interval_bytes=index_interval_bytes, name=name, topic=topic,
                   partition=partition, report=loaded.report,
                   log_start_offset=state.log_start_offset if state else 0)
        if plog._last_time > now_ms:
            log.warning("%s: last append time %d is after now %d; append times stay at it "
                        "until the clock catches up", name, plog._last_time, now_ms)
        if loaded.report is not None:
            log.warning("%s: recovered (after a crash, or damage found after a clean stop): %s", name, loaded.report,
                        extra={"event": "recovery", "partition_log": name, **dataclasses.asdict(loaded.report)})
        for seg in segments[:-1]:
            found = seg.check_tail()
            if found is not None:
                plog._report(seg, found)
        try:
            plog.checkpoint()
        except DiskFull as exc:  # recovery already made the log durable; the next checkpoint saves this
            log.warning("%s: %s", name, exc, extra={"event": "disk_full", "partition_log": name})
        return plog

    # -- properties ------------------------------------------------------------------

    @property
    def log_start_offset(self) -> int:
        return self._log_start

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._log_end

    @property
    def flushed_offset(self) -> int:
        """Every offset below this is fsynced."""
        return self._flushed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        """An fsync failed: the log refuses every call until opened again."""
        return self._failed is not None

    @property
    def writable(self) -> bool:
        """Whether the last segment is active (False: opened on a full disk; the next
        append tries again)."""
        return self._active.is_active

    # -- append and read ---------------------------------------------------------------

    def append(self, body: bytes, *, record_count: int, append_time_ms: int) -> AppendInfo:
        """Store one batch at ``log_end_offset``: ``append_batches`` of one, written
        out, as this is the hot path."""
        if not 0 < record_count <= MAX_RECORD_COUNT:
            raise InvalidBatch(f"record_count {record_count} is not in 1..{MAX_RECORD_COUNT}")
        with self._lock:
            self._check_open()
            base = self._log_end
            when = max(append_time_ms, self._last_time)
            try:
                frame = encode_frame(body, base_offset=base, append_time_ms=when,
                                     record_count=record_count)
            except ValueError:
                raise BatchTooLarge(len(body), MAX_FRAME_BYTES) from None
            try:
                self._make_room(len(frame), base, when)
                self._active.append(frame, base_offset=base, append_time_ms=when,
                                    record_count=record_count)
            except OSError as exc:  # not a context manager: see append_batches
                raise self._disk_full(exc, 1, len(frame)) from exc
            self._dirty.add(self._active)
            self._last_append = (base, self._last_time)
            self._log_end = base + record_count
            self._last_time = when
            return AppendInfo(base, when, len(frame))

    def append_batches(self, batches: Sequence[tuple[bytes, int]], *,
                       append_time_ms: int) -> list[AppendInfo]:
        """Store ``batches`` (body, record count) at ``log_end_offset``, in order, all
        or none (module docstring: they go into one segment, so ``undo_appends`` can
        take them back). The append time is made monotonic, ``max(append_time_ms,
        last append time)``, the same for each. DiskFull: nothing was stored."""
        for _, record_count in batches:
            if not 0 < record_count <= MAX_RECORD_COUNT:
                raise InvalidBatch(f"record_count {record_count} is not in 1..{MAX_RECORD_COUNT}")
        if not batches:
            return []
        with self._lock:
            self._check_open()
            base = self._log_end
            when = max(append_time_ms, self._last_time)
            frames, offset, size = [], base, 0
            for body, record_count in batches:
                try:
                    frame = encode_frame(body, base_offset=offset, append_time_ms=when,
                                         record_count=record_count)
                except ValueError:
                    raise BatchTooLarge(len(body), MAX_FRAME_BYTES) from None
                frames.append((frame, offset, record_count))
                offset += record_count
                size += len(frame)
            if size > MAX_FRAME_BYTES:  # positions in the index are uint32
                raise BatchTooLarge(size, MAX_FRAME_BYTES)
            try:
                self._make_room(size, frames[-1][1], when)
                self._active.append_frames(frames, size, append_time_ms=when)
            except OSError as exc:  # not a context manager: this is the hot path
                raise self._disk_full(exc, len(frames), size) from exc
            self._dirty.add(self._active)
            self._last_append = (base, self._last_time)
            self._log_end = offset
            self._last_time = when
            return [AppendInfo(o, when, len(frame)) for frame, o, _ in frames]

    def _disk_full(self, exc: OSError, batches: int, size: int) -> OSError:
        """What an append that failed with ``exc`` raises: DiskFull if it had no room."""
        if is_disk_full(exc) and not isinstance(exc, DiskFull):
            return DiskFull(f"append {batches} batch(es) of {size} bytes", name=self.name, cause=exc)
        return exc

    def _make_room(self, size: int, last_base: int, when: int) -> None:
        """Make the active segment able to take ``size`` more bytes: activate it (if
        opened on a full disk), roll, or grow an empty one for a big frame."""
        if not self._active.is_active:
            self._active.activate(self._segment_bytes)
            log.info("%s: segment %d is writable again", self.name, self._active.base_offset)
        if self._should_roll(size, last_base, when):
            self._roll(size)
        elif not self._active.fits(size):  # empty, and the frames are big
            self._active.grow(size)

    def undo_appends(self, offset: int) -> None:
        """Take back the batches at or after ``offset``, which one ``append_batches``
        call stored (so they are all in the active segment): the owner's request
        failed later on, on another partition. Their bytes are zeroed (and fsynced
        with the next flush). If the undo itself fails, the log fails (``LogFailed``)."""
        with self._lock:
            self._check_open()
            if offset >= self._log_end:
                return
            seg = self._active
            if offset < seg.base_offset:
                raise ValueError(f"offset {offset} is before the active segment {seg.base_offset}")
            try:
                seg.truncate_to(offset)
            except BaseException as exc:
                self._failed = LogFailed(self.directory, exc, self.name)
                raise
            self._log_end = offset
            if self._last_append[0] == offset:  # the last append, as the broker undoes
                self._last_time = self._last_append[1]
            else:  # the newest batch left sets the time (none left: the time stays)
                self._last_time = next((s.last_append_time_ms or 0 for s in reversed(self._segments) if s.size),
                                       self._last_time)
            self._dirty.add(seg)
            self._flushed = min(self._flushed, offset)
            self._undone_to = offset if self._undone_to is None else min(self._undone_to, offset)
            if self._recovery_point.offset > offset:
                self._recovery_point = RecoveryPoint(seg.base_offset, seg.size, offset)

    def _should_roll(self, frame_size: int, base: int, when: int) -> bool:
        seg = self._active
        if not seg.size:
            return False
        first = seg.first_append_time_ms
        return (seg.size + frame_size > self._segment_bytes or not seg.fits(frame_size)
                or (first is not None and when - first > self._segment_ms)
                or base - seg.base_offset > MAX_RELATIVE_OFFSET)

    def _roll(self, frame_size: int) -> None:
        old = self._active
        new = Segment.create(self.directory, self._log_end,
                             capacity_bytes=max(self._segment_bytes, frame_size),
                             index_interval_bytes=self._interval)
        try:
            old.seal()
        except BaseException:
            new.discard()  # the roll did not happen; the next append tries again
            raise
        old.set_end_offset(new.base_offset)
        self._segments.append(new)
        self._bases.append(new.base_offset)
        self._active = new
        self._dirty.update((old, new))
        self._dir_dirty = True

    def read(self, offset: int, limits: ReadLimits, *, end_offset: int | None = None) -> ReadResult:
        """Whole frames from the one containing ``offset``: at least one if any exists,
        then more (across segments) while the totals are within ``limits``; never a
        frame whose base offset is at or past ``end_offset`` (a reader's high
        watermark; None: the log end). Empty at or past ``end_offset``, up to the log
        end; outside ``[log_start_offset, log_end_offset]`` OffsetOutOfRange, which
        names ``[log_start_offset, end_offset]`` as the valid range (``check_offset``)."""
        with self._lock:
            self._check_open()
            bound = self._log_end if end_offset is None else min(end_offset, self._log_end)
            self._check_range(offset, bound)
            if offset >= bound:
                return ReadResult(b"", offset, offset, 0, 0)
            i = bisect.bisect_right(self._bases, offset) - 1
            seg = self._segments[i]
            self._check_size(seg)
            try:
                position = seg.find_position(offset)
            except CorruptRecords as exc:
                raise self._corrupt(seg, exc) from None
            chunks, total_bytes, batches, records, next_offset = [], 0, 0, 0, offset
            while True:
                part = seg.read(position, limits, taken_bytes=total_bytes, taken_records=records,
                                end_offset=bound)
                if part.batch_count:
                    chunks.append(part.data)
                    total_bytes += len(part.data)
                    batches += part.batch_count
                    records += part.record_count
                    next_offset = part.next_offset
                if part.damage is not None:
                    if not batches:  # the damage is where this read starts
                        raise self._corrupt(seg, part.damage)
                    break  # the good frames before it now; the next read reports it
                i += 1
                # Go on to the next segment only if this one was read to its end.
                reached_end = part.batch_count and part.next_offset == (
                    self._bases[i] if i < len(self._segments) else self._log_end)
                if i == len(self._segments) or not reached_end or next_offset >= bound:
                    break
                seg, position = self._segments[i], 0
                self._check_size(seg)
            if not batches:  # never "nothing" below the log end: a reader would wait forever
                end = self._bases[i] if i < len(self._segments) else self._log_end
                raise self._corrupt(seg, CorruptRecords(offset, max(offset, end - 1),
                                                        "no stored batch holds the offset"))
            data = b"".join(chunks)
            first = read_header(data, 0, len(data))
            assert first is not None  # the data is the whole frames just read
            first_offset = first.base_offset
            return ReadResult(data, first_offset, next_offset, batches, records)

    def offset_for_time(self, timestamp_ms: int) -> int:
        """First offset of the first batch appended at or after ``timestamp_ms``;
        ``log_end_offset`` if there is none. CorruptRecords if it may lie in a damaged
        range (whose append times are not known)."""
        with self._lock:
            self._check_open()
            i = bisect.bisect_left(self._segments, timestamp_ms, key=_newest_or_max)
            if i > 0 and self._segments[i - 1].tail_damage is not None:
                i -= 1  # its newest time is a lower bound: the answer may be in its tail
            pending, pending_in = None, self._segments[-1]
            for seg in self._segments[i:]:
                self._check_size(seg)
                try:
                    found, tail = seg.time_lookup(timestamp_ms, pending)
                except CorruptRecords as exc:
                    raise self._corrupt(pending_in if pending is not None and exc.first_offset
                                        == pending.first_offset else seg, exc) from None
                if found is not None:
                    return found
                if tail is not pending:
                    pending, pending_in = tail, seg
            if pending is not None:
                raise self._corrupt(pending_in, pending)
            return self._log_end

    def damaged(self) -> list[DamagedOffsets]:
        """The damaged ranges found so far (at start-up and by reads), in offset order;
        overlapping finds (the start-up check reads headers only, a read then finds the
        CRC failure of the frame before) are merged."""
        with self._lock:
            self._check_open()
            found = sorted((d.first_offset, d.last_offset, d.cause) for seg in self._segments
                           for d in seg.damage_found() if d.last_offset >= self._log_start)
        merged: list[DamagedOffsets] = []
        for first, last, cause in found:
            if merged and first <= merged[-1].last_offset:
                if last > merged[-1].last_offset:
                    merged[-1] = merged[-1]._replace(last_offset=last)
                continue
            merged.append(DamagedOffsets(first, last, cause))
        return merged

    def describe(self) -> LogStats:
        with self._lock:
            self._check_open()
            nonempty = [s for s in self._segments if s.size]
            return LogStats(
                self._log_start, self._log_end, len(self._segments),
                sum(s.size for s in self._segments),
                (nonempty[0].first_append_time_ms or 0) if nonempty else 0,
                self._last_time if nonempty else 0,
            )

    # -- durability ------------------------------------------------------------------

    def flush(self) -> int:
        """fsync everything appended so far; the new ``flushed_offset``."""
        with self._io_lock:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            self._check_open()
            target = self._log_end
            point = RecoveryPoint(self._active.base_offset, self._active.size, target)
            segments, dir_dirty = set(self._dirty), self._dir_dirty
            self._undone_to = None
            fds: list[int] = []
            try:
                for seg in segments:
                    fds.extend(seg.sync_fds())
            except BaseException:  # e.g. EMFILE: nothing was taken, nothing is lost
                for fd in fds:
                    os.close(fd)
                for seg in segments:
                    seg.mark_unsynced()
                raise
            self._dirty, self._dir_dirty = set(), False
        try:
            for fd in fds:
                sync_data(fd)
            if dir_dirty:
                fsync_directory(self.directory)
        except OSError as exc:
            # Never retry a failed fsync: the kernel may have marked the pages clean,
            # and a second fsync would then report data durable that is gone.
            with self._lock:
                self._failed = LogFailed(self.directory, exc, self.name)
            log.error("fsync failed in %s: %s; the partition refuses writes until restart",
                      self.directory, exc)
            raise self._failed from exc
        finally:
            for fd in fds:
                os.close(fd)
        with self._lock:
            for seg in segments:
                if seg is not self._active and seg not in self._dirty:
                    seg.release_fds()
            if self._undone_to is not None:  # what is past it now is not what was synced
                self._flushed = max(self._flushed, min(target, self._undone_to))
            elif target >= self._flushed:  # flushes are serialized, so this always holds
                self._flushed = target
                self._recovery_point = point
            return self._flushed

    def checkpoint(self) -> None:
        """Persist ``partition.json``: log_start_offset and the recovery point."""
        with self._io_lock:
            with self._lock:
                self._check_open()
                state = PartitionState(self._log_start, self._recovery_point)
            with disk_full_as("save partition.json", name=self.name):
                recovery.write_state(self.directory, state)

    # -- retention -------------------------------------------------------------------

    def delete_segments(self, predicate: Callable[[Segment], bool]) -> list[DeletedSegment]:
        """Delete the oldest non-active segments while ``predicate(segment)`` is true;
        moves and persists ``log_start_offset``."""
        deleted = self._delete_prefix(predicate, "predicate")
        if deleted:
            self.checkpoint()
        return deleted

    def apply_retention(self, *, now_ms: int, retention_ms: int,
                        retention_bytes: int) -> list[DeletedSegment]:
        """Delete non-active segments whose newest batch is older than
        ``now_ms - retention_ms``, then the oldest while the log is larger than
        ``retention_bytes``. A negative limit is unlimited."""
        deleted = []
        if retention_ms >= 0:
            limit = now_ms - retention_ms
            deleted += self._delete_prefix(
                lambda seg: (seg.last_append_time_ms or 0) < limit, "retention_ms")
        if retention_bytes >= 0:
            with self._lock:
                self._check_open()
                total = sum(s.size for s in self._segments)

            def too_big(seg: Segment) -> bool:
                nonlocal total
                if total <= retention_bytes:
                    return False
                total -= seg.size
                return True

            deleted += self._delete_prefix(too_big, "retention_bytes")
        if deleted:
            self.checkpoint()
        return deleted

    def _delete_prefix(self, predicate: Callable[[Segment], bool], reason: str) -> list[DeletedSegment]:
        renamed, deleted = [], []
        with self._lock:
            self._check_open()
            while len(self._segments) > 1 and predicate(self._segments[0]):
                seg = self._segments[0]
                info = DeletedSegment(seg.base_offset, self._segments[1].base_offset, seg.size,
                                      seg.last_append_time_ms or 0, reason)
                renamed += seg.delete()
                del self._segments[0], self._bases[0]
                self._dirty.discard(seg)
                self._log_start = max(self._log_start, self._segments[0].base_offset)
                deleted.append(info)
        for path in renamed:
            path.unlink(missing_ok=True)
        for info in deleted:
            log.info("%s: deleted segment %d (%s)", self.name, info.base_offset, info.reason)
        return deleted

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Flush, trim the files, persist state and mark a clean shutdown. Idempotent."""
        with self._io_lock:
            if self._closed:
                return
            if self._failed is not None:  # no clean-shutdown mark: the next start recovers
                self._release()
                return
            self._flush()
            with self._lock:
                self._active.seal()
                fds = self._active.sync_fds()
                self._closed = True
                state = PartitionState(
                    self._log_start,
                    RecoveryPoint(self._active.base_offset, self._active.size, self._log_end))
            try:
                for fd in fds:
                    sync_data(fd)
            finally:
                for fd in fds:
                    os.close(fd)
                for seg in self._segments:
                    seg.close()
            # No room for these: no clean-shutdown mark, so the next start recovers.
            with disk_full_as("save partition.json on close", name=self.name):
                recovery.write_state(self.directory, state)
                recovery.mark_clean_shutdown(self.directory)

    def delete(self) -> None:
        """Close and remove the whole directory (topic deletion)."""
        self.close()
        shutil.rmtree(self.directory)

    def __enter__(self) -> PartitionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failed is not None:  # first: a failed log stays failed once released
            raise self._failed
        if self._closed:
            raise LogClosed(self.directory, self.name)

    def _corrupt(self, seg: Segment, damage: DamagedRange | CorruptRecords) -> CorruptRecords:
        """The error for a damaged range of ``seg``, named; the range is logged once,
        with what only the broker's operator needs (file, byte position)."""
        if isinstance(damage, DamagedRange):
            self._report(seg, damage)
            damage = CorruptRecords(damage.first_offset, damage.last_offset, damage.cause)
        else:
            for found in seg.damage_found():
                if found.first_offset == damage.first_offset:
                    self._report(seg, found)
        return damage.named(topic=self.topic, partition=self.partition, name=self.name)

    def _check_size(self, seg: Segment) -> None:
        """A sealed segment cut short under the running broker is read only up to its
        new end (``Segment.check_size``, one stat); what it lost is a damaged range."""
        found = seg.check_size()
        if found is not None:
            self._report(seg, found)

    def _report(self, seg: Segment, damage: DamagedRange) -> None:
        key = (seg.base_offset, damage.position)
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning(
            "%s: offsets %d..%d cannot be read (%s): %s is damaged from byte %d; reads of them answer "
            "DATA_LOSS", self.name, damage.first_offset, damage.last_offset, damage.cause, seg.log_path,
            damage.position,
            extra={"event": "log_damaged", "partition_log": self.name, "first_offset": damage.first_offset,
                   "last_offset": damage.last_offset, "cause": damage.cause, "segment": str(seg.log_path),
                   "position": damage.position})

    def check_offset(self, offset: int, *, end_offset: int | None = None) -> None:
        """OffsetOutOfRange unless ``log_start_offset <= offset <= log_end_offset``,
        naming ``[log_start_offset, end_offset]`` (default: the log end) as the valid
        range: the check ``read`` makes, for a reader about to wait at the end."""
        with self._lock:
            self._check_range(offset, self._log_end if end_offset is None else end_offset)

    def _check_range(self, offset: int, end_offset: int) -> None:
        """Offsets up to the log end are in range; the error names ``end_offset``
        (what the reader may see) as the end of the valid range."""
        if not self._log_start <= offset <= self._log_end:
            raise OffsetOutOfRange(offset, self._log_start, end_offset, topic=self.topic,
                                   partition=self.partition, name=self.name)

    def abandon(self) -> None:
        """Drop maps and descriptors without flushing or marking a clean shutdown: the
        files are left as a crash would leave them, to be opened again (a failed log)."""
        self._release()

    def _release(self) -> None:
        """Drop maps and descriptors without flushing or marking a clean shutdown: the
        files are left as a crash would leave them (for tests)."""
        with self._lock:
            self._closed = True
            for seg in self._segments:
                seg.close()

    def __repr__(self) -> str:
        return (f"PartitionLog({self.name!r}, start={self._log_start}, end={self._log_end}, "
                f"segments={len(self._segments)})")


def sync_data(fd: int) -> None:
    """Make a file's data durable (module docstring: why ``fdatasync``)."""
    os.fdatasync(fd)


def _activate(seg: Segment, capacity_bytes: int, name: str) -> None:
    """Make the last segment active; on a full disk leave it readable (module docstring)."""
    try:
        seg.activate(capacity_bytes)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        log.warning("%s: no space to make segment %d writable; serving reads, appends answer DISK_FULL "
                    "until there is", name, seg.base_offset, extra={"event": "disk_full", "partition_log": name})


def _first_segment(directory: Path, base_offset: int, capacity_bytes: int, interval: int, name: str) -> Segment:
    """A new partition's first segment; on a full disk an empty one, not active yet."""
    try:
        return Segment.create(directory, base_offset, capacity_bytes=capacity_bytes, index_interval_bytes=interval)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        log.warning("%s: no space for a new segment; appends answer DISK_FULL until there is", name,
                    extra={"event": "disk_full", "partition_log": name})
        return Segment.create_empty(directory, base_offset, index_interval_bytes=interval)


def _newest_or_max(seg: Segment) -> int:
    newest = seg.last_append_time_ms
    return (1 << 63) if newest is None else newest
