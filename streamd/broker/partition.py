"""One partition as the broker sees it: a PartitionLog plus what concurrency needs.

``Partition`` is the only face of storage above ``segments``: everything else (the
broker, the services, queue groups, metrics) reads, asks offsets and describes a
partition through it, never through its ``PartitionLog``. Reads are ``read(offset,
limits)``: the range check and the high-watermark cut happen here, once (in
``PartitionLog.read``, given the high watermark as its end), and the answer is a
``ReadOut`` whose ``frames()`` walks the stored frames. Cluster mode adds
``truncate_to(offset)`` (a follower cut back to the leader's log),
``append_frames(frames)`` (a follower appending the leader's stored frames as they
are) and ``delete_before(offset)`` (retention by offset) to this face.

- Appends run on the event-loop thread (one writer per partition by construction:
  asyncio runs one coroutine at a time and ``append`` does not await mid-request).
- Durability: ``sync_to(offset)`` waits until everything below ``offset`` is fsynced.
  It is group commit: while one fsync runs in the thread pool, later appenders wait
  for the next one, which then covers all of them with a single fsync.
- Readers waiting for new data (long-poll Fetch, Subscribe) park on a future that the
  next append (or, for fsync=always topics, the next fsync; or topic deletion)
  resolves. Readers never see past ``high_watermark``.
- Idempotent producers' state (``producers``) and the dedup window (``dedup``, on
  topics with one) change with each append, in the same step, so they always agree
  with the log; ``write_snapshot`` persists the producer state (``producer_state``).
- An append is all or none: ``store`` puts a request's batches in the log in one
  ``PartitionLog.append_batches`` (``undo`` takes them back if the request fails on
  another partition), and only then does ``remember`` record them in the producer
  state and the dedup window and wake readers. A refused append (DiskFull) changes
  nothing, so an idempotent producer's sequence does not move.
- A failed log (an fsync error) is replaced by a fresh one opened from disk
  (``replace_log``, the broker's repair job), with the producer state and dedup
  window rebuilt from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from segments import (
    AppendInfo,
    DamagedOffsets,
    DeletedSegment,
    FrameHeader,
    LogStats,
    PartitionLog,
    ReadLimits,
    RecoveryReport,
    iter_frames,
)

from .batches import CheckedBatch
from .dedup import DedupWindow
from .producer_state import BatchMeta, ProducerStateTable, write_snapshot


@dataclass(frozen=True, slots=True)
class ReadOut:
    """Stored frames (``data``, whole frames back to back) and where the partition
    stood when they were read: ``log_end_offset`` is the high watermark."""

    data: bytes
    next_offset: int
    log_start_offset: int
    log_end_offset: int

    def frames(self) -> Iterator[FrameHeader]:
        """The headers of the frames in ``data`` (positions relative to it)."""
        return iter_frames(self.data)


_ONE_FRAME = ReadLimits(max_records=1, max_bytes=1)


class Partition:
    def __init__(
        self,
        topic: str,
        index: int,
        log: PartitionLog,
        *,
        executor: Executor,
        fsync_always: bool = False,
        producers: ProducerStateTable | None = None,
        snapshot_covers: int = -1,
        dedup: DedupWindow | None = None,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        """``on_fsync(seconds)`` is told, on the event loop, how long each group-commit
        fsync took (in its worker thread)."""
        self.topic = topic
        self.index = index
        self._log = log
        self.producers = producers if producers is not None else ProducerStateTable()
        self.dedup = dedup
        #: What the producer snapshot on disk covers, and the table version it holds.
        self._snapshot_covers = snapshot_covers
        self._snapshot_version = self.producers.version
        self._snapshot_lock = asyncio.Lock()
        #: fsync=always: readers see only fsynced records (the high watermark), so no
        #: consumer acts on a record that a power loss could still take back.
        self.wait_for_durability = fsync_always
        self._executor = executor
        self._flush_task: asyncio.Future[int] | None = None
        self._data: asyncio.Future[None] | None = None
        self.closed = False
        #: When the interval-fsync job last flushed this partition (broker clock).
        self.last_flush_ms = 0
        self._on_fsync = on_fsync
        #: Since start-up (metrics): segments and bytes retention deleted.
        self.retention_deleted_segments = 0
        self.retention_deleted_bytes = 0
        #: Since start-up (metrics): produce requests refused for lack of space, and
        #: whether the last append to this partition was (logged when it changes).
        self.disk_full_refusals = 0
        self.disk_full = False
        #: The broker's reopening of this partition's failed log, while it runs.
        self.repair: asyncio.Future | None = None
        #: Background jobs whose last run found no room (logged once until they work).
        self.failing_jobs: set[str] = set()

    # -- writing -------------------------------------------------------------
    def append(
        self,
        batches: list[CheckedBatch],
        *,
        now_ms: int,
        answers: list[tuple[tuple[int, int], ...]] | None = None,
    ) -> tuple[int, int, int]:
        """Append checked batches, all or none; returns (base_offset, record_count,
        append_time_ms). ``store`` then ``remember``, for a request with one plan."""
        base = self._log.log_end_offset
        infos = self.store(batches, now_ms=now_ms)
        return self.remember(batches, iter(infos), base_offset=base, now_ms=now_ms, answers=answers)

    def store(self, batches: list[CheckedBatch], *, now_ms: int) -> list[AppendInfo]:
        """Put the batches that hold records in the log, all or none (DiskFull, or
        any error: none); nothing else changes until ``remember``."""
        if len(batches) == 1:  # the usual request
            b = batches[0]
            return [self._log.append(b.body, record_count=b.record_count, append_time_ms=now_ms)] if b.record_count else []
        stored = [(b.body, b.record_count) for b in batches if b.record_count]
        return self._log.append_batches(stored, append_time_ms=now_ms)

    def undo(self, offset: int) -> None:
        """Take back what ``store`` put in the log from ``offset`` (the request failed
        on another partition before anything of it was remembered)."""
        self._log.undo_appends(offset)

    def remember(
        self,
        batches: list[CheckedBatch],
        infos: Iterator[AppendInfo],
        *,
        base_offset: int,
        now_ms: int,
        answers: list[tuple[tuple[int, int], ...]] | None = None,
    ) -> tuple[int, int, int]:
        """Record stored ``batches`` (``infos``: what ``store`` answered for those
        with records, consumed in order; ``base_offset``: where the first went) in
        the producer state and the dedup window, and wake readers; returns
        (base_offset, record_count, append_time_ms).

        ``answers`` (aligned with ``batches``; None: nothing dropped) lists the
        records the dedup window dropped from each batch and the offsets answered,
        which an idempotent batch keeps so that a retry gets the same answer.
        """
        offset = base_offset
        append_time = now_ms
        count = 0
        for k, b in enumerate(batches):
            where = offset
            if b.record_count:
                info = next(infos)
                where, append_time = info.base_offset, info.append_time_ms
                offset = where + b.record_count
                count += b.record_count
                if b.keys is not None and self.dedup is not None:
                    self.dedup.add(b.keys, where, append_time)
            # else: the dedup window dropped every record: only the sequence moves
            if b.producer_id:
                meta = BatchMeta(b.base_sequence, b.sequence_count or b.record_count, where, b.record_count,
                                 append_time, answers[k] if answers is not None else ())
                self.producers.record(b.producer_id, meta, now_ms)
        if not self.wait_for_durability:
            self._wake()
        return base_offset, count, append_time

    def replace_log(self, log: PartitionLog, producers: ProducerStateTable, snapshot_covers: int,
                    dedup: DedupWindow | None) -> None:
        """Take a log opened again from disk (after this one failed) with the state
        rebuilt from it; readers are woken (what they wait for may have been cut)."""
        self._log = log
        self.producers = producers
        self.dedup = dedup
        self._snapshot_covers = snapshot_covers
        self._snapshot_version = producers.version
        self._wake()

    async def write_snapshot(self, now_ms: int) -> None:
        """Persist the producer state if it or the log moved since the last snapshot.

        The file covers the log end when the state was taken and is written only
        once the log is fsynced that far, so after a crash it never claims batches
        the log lost. Snapshots are written one at a time, in the order taken.
        """
        async with self._snapshot_lock:
            self.producers.expire(now_ms)
            covers, version = self._log.log_end_offset, self.producers.version
            if covers == self._snapshot_covers and version == self._snapshot_version:
                return
            data = self.producers.snapshot(covers)
            await self.sync_to(covers)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, write_snapshot, self._log.directory, data)
            self._snapshot_covers, self._snapshot_version = covers, version

    async def sync_to(self, offset: int) -> None:
        """Return once every record below ``offset`` is fsynced (group commit)."""
        while self._log.flushed_offset < offset:
            if self._flush_task is None:
                self._flush_task = asyncio.ensure_future(self._flush())
            await asyncio.shield(self._flush_task)

    async def flush(self) -> None:
        if self._log.flushed_offset < self._log.log_end_offset:
            await self.sync_to(self._log.log_end_offset)

    async def _flush(self) -> int:
        try:
            loop = asyncio.get_running_loop()
            flushed, seconds = await loop.run_in_executor(self._executor, self._timed_flush)
        finally:
            self._flush_task = None
        if self._on_fsync is not None:
            self._on_fsync(seconds)
        if self.wait_for_durability:
            self._wake()
        return flushed

    def _timed_flush(self) -> tuple[int, float]:
        start = time.perf_counter()
        flushed = self._log.flush()
        return flushed, time.perf_counter() - start

    @property
    def high_watermark(self) -> int:
        """The end of what readers may see: the fsynced end for fsync=always topics,
        the log end otherwise."""
        return self._log.flushed_offset if self.wait_for_durability else self._log.log_end_offset

    # -- reading: the storage face (module docstring) ---------------------------
    @property
    def log_start_offset(self) -> int:
        return self._log.log_start_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets (readers see up to the high
        watermark, which may be below it)."""
        return self._log.log_end_offset

    def read(self, offset: int, limits: ReadLimits) -> ReadOut:
        """Stored frames from the one holding ``offset``, within ``limits`` and never
        past the high watermark; empty at (or past, up to the log end) the high
        watermark. OffsetOutOfRange outside ``[log_start_offset, log_end_offset]``,
        naming ``[log_start_offset, high_watermark]`` as the valid range."""
        end = self.high_watermark
        res = self._log.read(offset, limits, end_offset=end)
        return ReadOut(res.data, res.next_offset, self._log.log_start_offset, end)

    def check_offset(self, offset: int) -> None:
        """The range check of ``read`` alone (a reader about to wait at the end)."""
        self._log.check_offset(offset, end_offset=self.high_watermark)

    def offset_for_time(self, timestamp_ms: int) -> int:
        """First offset of the first batch appended at or after ``timestamp_ms``,
        capped at the high watermark."""
        return min(self._log.offset_for_time(timestamp_ms), self.high_watermark)

    def append_time_at(self, offset: int) -> int | None:
        """Append time of the batch holding ``offset``; None at or past the high
        watermark. OffsetOutOfRange, CorruptRecords as ``read``."""
        first = next(self.read(offset, _ONE_FRAME).frames(), None)
        return first.append_time_ms if first is not None else None

    def describe(self) -> LogStats:
        return self._log.describe()

    def damaged(self) -> list[DamagedOffsets]:
        return self._log.damaged()

    @property
    def recovery(self) -> RecoveryReport | None:
        """What opening the log recovered (None: a clean open)."""
        return self._log.recovery

    @property
    def directory(self) -> Path:
        return self._log.directory

    @property
    def writable(self) -> bool:
        """False while the log has no room to make its last segment active."""
        return self._log.writable

    @property
    def failed(self) -> bool:
        """The log's fsync failed: it refuses every call until the repair job has
        opened it again (``replace_log``)."""
        return self._log.failed

    @property
    def log_open(self) -> bool:
        """The log serves calls (neither closed nor failed)."""
        return not (self._log.closed or self._log.failed)

    # -- upkeep (blocking: run in the executor) --------------------------------
    def checkpoint(self) -> None:
        """Persist the log's recovery point and log start offset."""
        self._log.checkpoint()

    def apply_retention(self, *, now_ms: int, retention_ms: int, retention_bytes: int) -> list[DeletedSegment]:
        """Delete the segments retention no longer keeps (``PartitionLog.apply_retention``)."""
        return self._log.apply_retention(now_ms=now_ms, retention_ms=retention_ms, retention_bytes=retention_bytes)

    def close_log(self) -> None:
        """Close the log cleanly (flush, clean-shutdown mark); after ``close``."""
        self._log.close()

    def holds(self, log: PartitionLog) -> bool:
        """Whether ``log`` is the log this partition serves (the repair job's check
        that nobody replaced or closed it meanwhile)."""
        return self._log is log

    def failed_log(self) -> PartitionLog | None:
        """The log, if it failed: what the repair job abandons and opens again."""
        return self._log if self._log.failed else None

    # -- waiting for data ----------------------------------------------------
    async def wait_for_data(self, offset: int, timeout_s: float | None) -> bool:
        """Wait until the high watermark passes ``offset``; False on timeout."""
        if self.high_watermark > offset or self.closed:
            return True
        if self._data is None or self._data.done():
            self._data = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._data), timeout_s)
        except TimeoutError:
            return False
        return True

    def _wake(self) -> None:
        if self._data is not None and not self._data.done():
            self._data.set_result(None)
        self._data = None

    def close(self) -> None:
        """Wake every waiter; the log itself is closed by the owner."""
        self.closed = True
        self._wake()
