"""OffsetStore: the committed offsets of stream consumer groups, crash-safe.

Owns ``DIR/offsets.journal``, an append-only journal of frames::

    frame   = header payload
    header  = struct "<II": payload length (> 0), zlib.crc32(payload)
    payload = compact UTF-8 JSON of one operation:
      {"op":"commit","g":G,"o":[[topic,partition,offset,metadata,commit_time_ms],...]}
      {"op":"delete_group","g":G}              offsets and undo record of G
      {"op":"delete_topic","t":T}              every group's offsets and undo entries for T
      {"op":"delete_partitions","g":G,"p":[[topic,partition],...]}   offsets only
      {"op":"undo","g":G,"o":[[topic,partition,offset],...]}         replaces G's record

State is the result of replaying the frames in order.

Invariants:

- Durable before acknowledged: a write call returns only after its frame is fsynced.
  Memory changes only then, in operation order, so readers never see what a crash
  could take back.
- Group commit: calls made while a write+fsync runs queue up and the next flush covers
  all of them with one ``os.write`` and one ``os.fsync``.
- Single writer: all file I/O after open (write, fsync, compaction) runs in one flusher
  job at a time in the executor, never on the event loop; so the file needs no lock.
- Bounded: after a flush, when the journal exceeds ``compact_bytes`` and twice the size
  of a snapshot of the live state, it is replaced (``write_atomic``) by that snapshot:
  one commit frame per group plus one undo frame per undo record.
- Recovery on open replays frames up to the first one that is torn, fails its CRC or
  does not decode, truncates the file there (fsynced) and logs what it cut.
- A failed write or fsync fails every caller of that batch with the ``OSError`` and
  leaves memory unchanged. The file's state is then unknown (Linux may drop the dirty
  pages), so the store refuses further writes with ``OffsetStoreFailed``; reopening
  recovers. A failed call's frame may still reappear after a restart: not acknowledged
  does not mean not applied.

Not thread-safe: construct it before serving (open does blocking I/O) and call every
method from one event loop thread. Reads are plain in-memory lookups.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segments.checkpoint import TEMP_SUFFIX, fsync_directory, write_atomic

if TYPE_CHECKING:
    from streamd.clock import Clock

log = logging.getLogger("streamd.offsets")

JOURNAL_NAME = "offsets.journal"
DEFAULT_COMPACT_BYTES = 4 << 20
FRAME_HEADER = struct.Struct("<II")

TopicPartition = tuple[str, int]


class OffsetStoreFailed(OSError):
    """An earlier write failed or the store is closed; the journal takes no more writes."""


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    metadata: str
    commit_time_ms: int


class OffsetStore:
    """Committed offsets keyed by (group, topic, partition), plus one undo record per
    group (the offsets before its last reset). See the module docstring for the format."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock,
        executor: concurrent.futures.Executor | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        self._path = Path(directory) / JOURNAL_NAME
        self._clock = clock
        self._executor = executor
        self._compact_bytes = compact_bytes
        # Recheck for compaction only past this size; it grows with the live state so
        # that a large state is not re-encoded after every flush.
        self._compact_threshold = compact_bytes
        self._offsets: dict[str, dict[TopicPartition, CommittedOffset]] = {}
        self._undo: dict[str, dict[TopicPartition, int]] = {}
        self._pending: list[tuple[bytes, dict, asyncio.Future]] = []
        self._flusher: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self._fd = self._open(Path(directory))
        self._size = self._recover()

    # -- reading -------------------------------------------------------------
    def get(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        return self._offsets.get(group, {}).get((topic, partition))

    def offsets(self, group: str) -> dict[TopicPartition, CommittedOffset]:
        return dict(self._offsets.get(group, {}))

    def groups(self) -> list[str]:
        return sorted(self._offsets)

    def last_commit_ms(self, group: str) -> int:
        return max((c.commit_time_ms for c in self._offsets.get(group, {}).values()), default=0)

    def undo_offsets(self, group: str) -> dict[TopicPartition, int] | None:
        undo = self._undo.get(group)
        return None if undo is None else dict(undo)

    @property
    def journal_bytes(self) -> int:
        return self._size

    # -- writing -------------------------------------------------------------
    async def commit(self, group: str, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        _check_name(group, "group")
        now_ms = self._clock.now_ms()
        entries = []
        for key, value in offsets.items():
            topic, partition = _check_key(key)
            if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)):
                raise ValueError(f"offset and metadata must be a (int, str) tuple, not {value!r}")
            entries.append([topic, partition, _check_index(value[0], "offset"), value[1], now_ms])
        if entries:
            await self._submit({"op": "commit", "g": group, "o": entries})

    async def delete_group(self, group: str) -> None:
        await self._submit({"op": "delete_group", "g": _check_name(group, "group")})

    async def delete_topic(self, topic: str) -> list[str]:
        """Remove every group's offsets (and undo entries) for ``topic``; the groups affected."""
        return await self._submit({"op": "delete_topic", "t": _check_name(topic, "topic")})

    async def delete_partitions(self, group: str, partitions: Iterable[TopicPartition]) -> None:
        """Remove committed offsets only: an undo record still restores what it saved."""
        keys = [list(_check_key(key)) for key in partitions]
        await self._submit({"op": "delete_partitions", "g": _check_name(group, "group"), "p": keys})

    async def save_undo(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        # -1: the group had no committed offset there (undo removes the commit).
        entries = [[*_check_key(key), _check_index(offset, "offset", minimum=-1)] for key, offset in offsets.items()]
        await self._submit({"op": "undo", "g": _check_name(group, "group"), "o": entries})

    async def close(self) -> None:
        """Refuse new writes, wait for queued ones, close the file. Idempotent."""
        self._closed = True
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def _submit(self, op: dict) -> Any:
        if (refusal := self._refusal()) is not None:
            raise refusal
        future = asyncio.get_running_loop().create_future()
        self._pending.append((_frame(op), op, future))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_pending())
        return await future

    def _refusal(self) -> OffsetStoreFailed | None:
        if self._failed is not None:
            return OffsetStoreFailed(errno.EIO, f"offset journal {self._path} failed earlier: {self._failed!r}")
        if self._closed:
            return OffsetStoreFailed(errno.EBADF, f"offset store {self._path} is closed")
        return None

    # -- the flusher (one at a time) ----------------------------------------
    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[bytes, dict, asyncio.Future]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                data = b"".join(frame for frame, _, _ in batch)
                await loop.run_in_executor(self._executor, _append, self._fd, data)
                self._size += len(data)
                for _, op, future in batch:
                    _settle(future, result=self._apply(op))
                batch = []
                if self._size > self._compact_threshold:
                    await self._compact(loop)
        except BaseException as exc:
            # A failed compaction fails the store too: the rename may have happened, and
            # appending to the old file would then lose data.
            self._failed = exc
            log.error("offset journal %s failed, refusing further writes: %r", self._path, exc)
            error = exc if isinstance(exc, Exception) else OffsetStoreFailed(errno.EIO, repr(exc))
            for _, _, future in batch:
                _settle(future, exc=error)
            if not isinstance(exc, Exception):
                # Cancelled (the loop is going away) while the job may still run: leak the
                # fd rather than let close() free its number for reuse under that job.
                self._fd = -1
                raise
        finally:
            self._flusher = None
            if self._failed is not None:  # calls queued behind the failure
                batch, self._pending = self._pending, []
                for _, _, future in batch:
                    _settle(future, exc=self._refusal())

    async def _compact(self, loop: asyncio.AbstractEventLoop) -> None:
        fd, snapshot_bytes = await loop.run_in_executor(self._executor, self._rewrite)
        if fd is not None:
            log.info("compacted %s from %d to %d bytes", self._path, self._size, snapshot_bytes)
            self._fd, self._size = fd, snapshot_bytes
        self._compact_threshold = max(self._compact_bytes, 2 * snapshot_bytes)

    def _rewrite(self) -> tuple[int | None, int]:
        """Executor job: (new fd, size) if the journal was replaced by a snapshot, else
        (None, snapshot size). Safe to read the state here: only the flusher changes it,
        and it is waiting for this job."""
        snapshot = self._snapshot()
        if self._size <= 2 * len(snapshot):
            return None, len(snapshot)
        write_atomic(self._path, snapshot)
        fd = _open_journal(self._path)
        os.close(self._fd)
        return fd, len(snapshot)

    def _snapshot(self) -> bytes:
        ops: list[dict] = []
        for group, offsets in self._offsets.items():
            entries = [[t, p, c.offset, c.metadata, c.commit_time_ms] for (t, p), c in offsets.items()]
            ops.append({"op": "commit", "g": group, "o": entries})
        for group, undo in self._undo.items():
            ops.append({"op": "undo", "g": group, "o": [[t, p, o] for (t, p), o in undo.items()]})
        return b"".join(_frame(op) for op in ops)

    # -- applying operations (live and in recovery) --------------------------
    def _apply(self, op: dict) -> Any:
        """Apply one decoded operation; checks everything before changing anything, so
        a malformed frame read in recovery raises (KeyError/TypeError/ValueError) and
        leaves the state as it was."""
        kind = op["op"]
        if kind == "commit":
            group = _check_name(op["g"], "group")
            parsed = [(_check_key((t, p)), _committed(o, m, ms)) for t, p, o, m, ms in op["o"]]
            if parsed:
                self._offsets.setdefault(group, {}).update(parsed)
            return None
        if kind == "delete_group":
            group = _check_name(op["g"], "group")
            self._offsets.pop(group, None)
            self._undo.pop(group, None)
            return None
        if kind == "delete_topic":
            return self._remove_topic(_check_name(op["t"], "topic"))
        if kind == "delete_partitions":
            group = _check_name(op["g"], "group")
            keys = [_check_key((t, p)) for t, p in op["p"]]
            offsets = self._offsets.get(group, {})
            for key in keys:
                offsets.pop(key, None)
            if not offsets:
                self._offsets.pop(group, None)
            return None
        if kind == "undo":
            group = _check_name(op["g"], "group")
            self._undo[group] = {_check_key((t, p)): _check_index(o, "offset", minimum=-1) for t, p, o in op["o"]}
            return None
        raise ValueError(f"unknown operation {kind!r}")

    def _remove_topic(self, topic: str) -> list[str]:
        affected = set()
        for table in (self._offsets, self._undo):
            for group, entries in list(table.items()):
                keys = [key for key in entries if key[0] == topic]
                for key in keys:
                    del entries[key]
                if keys:
                    affected.add(group)
                    if not entries and table is self._offsets:
                        del table[group]  # groups() lists only groups with offsets
        return sorted(affected)

    # -- open and recovery ---------------------------------------------------
    def _open(self, directory: Path) -> int:
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_directory(directory.parent)
        for leftover in directory.glob(f".{JOURNAL_NAME}.*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # an unfinished compaction: the journal is intact
        created = not self._path.exists()
        fd = _open_journal(self._path)
        if created:
            fsync_directory(directory)  # else a power loss could drop the file and what it holds
        return fd

    def _recover(self) -> int:
        data = self._path.read_bytes()
        position = 0
        while (frame := _read_frame(data, position)) is not None:
            op, end = frame
            try:
                self._apply(op)
            except (KeyError, TypeError, ValueError):
                break
            position = end
        if position < len(data):
            log.warning("offset journal %s: truncated at position %d, cutting %d bytes of torn or corrupt data",
                        self._path, position, len(data) - position)
            os.ftruncate(self._fd, position)
            os.fsync(self._fd)
        return position


# -- frames ------------------------------------------------------------------
def _frame(op: dict) -> bytes:
    payload = json.dumps(op, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read_frame(data: bytes, position: int) -> tuple[dict, int] | None:
    """The operation at ``position`` and where it ends; None if torn or corrupt."""
    if len(data) - position < FRAME_HEADER.size:
        return None
    length, crc = FRAME_HEADER.unpack_from(data, position)
    start = position + FRAME_HEADER.size
    # length 0 is refused: a zero-filled tail (a crash on some file systems) would
    # otherwise pass as empty frames, since crc32(b"") == 0.
    if length == 0 or start + length > len(data):
        return None
    payload = data[start:start + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        op = json.loads(payload.decode("utf-8"))
    except ValueError:
        return None
    return (op, start + length) if isinstance(op, dict) else None


def _open_journal(path: Path) -> int:
    # O_APPEND: writes land at the end even right after a recovery truncation.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _append(fd: int, data: bytes) -> None:
    """Executor job: one write (looping only on a short write) and one fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _settle(future: asyncio.Future, *, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled; the operation itself still happened
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


# -- validation (defence in depth: the broker checks names first) -----------
def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, not {value!r}")
    return value


def _committed(offset: object, metadata: object, commit_time_ms: object) -> CommittedOffset:
    if not isinstance(metadata, str):
        raise ValueError(f"metadata must be a string, not {metadata!r}")
    return CommittedOffset(_check_index(offset, "offset"), metadata, _check_index(commit_time_ms, "commit_time_ms"))


def _check_index(value: object, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, not {value!r}")
    return value


def _check_key(key: object) -> TopicPartition:
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise ValueError(f"a partition key must be (topic, partition), not {key!r}")
    return _check_name(key[0], "topic"), _check_index(key[1], "partition")
