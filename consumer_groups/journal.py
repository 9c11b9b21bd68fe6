"""Journal: an append-only file of JSON operations, group-committed and compacted.

The storage under consumer state (committed offsets, queue groups). One file::

    frame   = header payload
    header  = struct "<II": payload length (> 0), zlib.crc32(payload)
    payload = compact UTF-8 JSON object: one operation of the owner's

The owner gives two callbacks: ``apply(op)`` (used in recovery, to rebuild state from
the frames in order) and ``snapshot() -> list[op]`` (operations that rebuild the
current state from nothing, used for compaction).

Invariants:

- ``write(op, durable=True)`` returns a future that completes once the frame is
  fsynced. ``durable=False`` frames are written with the next flush and fsynced only
  with a later durable one: they survive a process crash (page cache), not
  necessarily a power loss.
- Group commit: writes queued while a flush runs go out together in the next one: one
  ``os.write`` and (if any of them is durable) one ``os.fsync``.
- Single writer: all file I/O after open (write, fsync, compaction) runs in one flusher
  job at a time in the executor, never on the event loop.
- Bounded: after a flush, when the file exceeds ``compact_bytes`` and twice the size of
  a snapshot, it is replaced (``write_atomic``) by the snapshot.
- Recovery replays frames up to the first one that is torn, fails its CRC, does not
  decode or is refused by ``apply`` (KeyError/TypeError/ValueError), truncates the
  file there (fsynced) and logs what it cut.
- A failed write, fsync or compaction fails the callers of that flush (``DiskFull``
  when there was no room, else ``JournalFailed``) and the calls queued behind it.
  The file's state is then unknown (a failed fsync may have dropped pages, or kept
  them marked clean, of earlier frames too), so it is never appended to again:
  before the next durable write (or ``ready``) the flusher rewrites it whole from the
  owner's ``snapshot()`` (``write_atomic``: a new file, fsynced, renamed over it), which
  makes the disk hold exactly the owner's state, then goes on. Until that works
  (space returns) every durable write fails with the rewrite's error; operations
  written lazily meanwhile are dropped, as the rewrite will hold their effect (the
  owner's state has it, or, for owners that change state only once an operation is
  durable, the operation never took effect).

Not thread-safe: open it before serving (blocking I/O), then use one event loop.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

from segments.checkpoint import TEMP_SUFFIX, fsync_directory, write_atomic
from segments.errors import DiskFull, is_disk_full

log = logging.getLogger("streamd.journal")

DEFAULT_COMPACT_BYTES = 4 << 20
FRAME_HEADER = struct.Struct("<II")


class JournalFailed(OSError):
    """A write failed (other than for lack of space), or the journal is closed."""


class Journal:
    def __init__(
        self,
        path: Path,
        *,
        apply: Callable[[dict], Any],
        snapshot: Callable[[], list[dict]],
        executor: concurrent.futures.Executor | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        """Open (creating) ``path`` and replay it through ``apply``. Blocking."""
        self.path = Path(path)
        self._snapshot = snapshot
        self._executor = executor
        self._compact_bytes = compact_bytes
        # Recheck for compaction only past this size; it grows with the live state so
        # that a large state is not re-encoded after every flush.
        self._compact_threshold = compact_bytes
        self._pending: list[tuple[bytes, asyncio.Future | None, dict, Callable | None]] = []
        self._flusher: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self._rewrite_wanted = False  # ``ready`` asks the flusher to rewrite a failed file
        self._closed = False
        self._fd = self._open()
        self.size = self._recover(apply)

    # -- writing -------------------------------------------------------------
    @overload
    def write(
        self, op: dict, *, durable: Literal[True] = True, then: Callable[[dict], Any] | None = None
    ) -> asyncio.Future[Any]: ...
    @overload
    def write(self, op: dict, *, durable: Literal[False], then: Callable[[dict], Any] | None = None) -> None: ...
    @overload
    def write(
        self, op: dict, *, durable: bool, then: Callable[[dict], Any] | None = None
    ) -> asyncio.Future[Any] | None: ...

    def write(
        self, op: dict, *, durable: bool = True, then: Callable[[dict], Any] | None = None
    ) -> asyncio.Future[Any] | None:
        """Queue ``op``; for a durable one, a future that completes once it is fsynced,
        with the result of ``then(op)``, which the flusher calls right after the fsync
        and before any compaction (so an owner that changes its state only once an
        operation is durable is never snapshotted without it). Raises
        ``JournalFailed`` at once when the journal is closed."""
        if self._closed:
            raise self._closed_error()
        future = asyncio.get_running_loop().create_future() if durable else None
        self._pending.append((encode_frame(op), future, op, then))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_pending())
        return future

    def check(self) -> None:
        """Raise ``JournalFailed`` if the journal is closed."""
        if self._closed:
            raise self._closed_error()

    async def ready(self) -> None:
        """Return once the journal takes writes: after a failure, once the flusher
        rewrote it from the snapshot (module docstring); raises that rewrite's error
        (``DiskFull``, ``JournalFailed``) if it still cannot. Owners that change their
        state before writing call this first, so that nothing changes while the
        journal cannot take it."""
        self.check()
        if self._failed is None:
            return
        self._rewrite_wanted = True
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_pending())
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._failed is not None:
            raise self._error(self._failed)

    async def close(self) -> None:
        """Refuse new writes, wait for queued ones, close the file. Idempotent."""
        self._closed = True
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _closed_error(self) -> JournalFailed:
        return JournalFailed(errno.EBADF, f"journal {self.path.name} is closed")

    def _error(self, exc: BaseException) -> Exception:
        """What callers of a failed flush (and the calls behind it) get."""
        if is_disk_full(exc):
            return exc if isinstance(exc, DiskFull) else DiskFull(f"write {self.path.name}", cause=exc)
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        return JournalFailed(code, f"journal {self.path.name} failed to write ({exc}); "
                                   "it is rewritten from memory with the next write")

    # -- the flusher (one at a time) ----------------------------------------
    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[bytes, asyncio.Future | None, dict, Callable | None]] = []
        try:
            while True:
                if self._failed is not None:
                    if not (self._rewrite_wanted or any(future is not None for _, future, _, _ in self._pending)):
                        self._pending = []  # lazy only: the rewrite will hold their effect
                        break
                    await self._rewrite_failed(loop)
                if not self._pending:
                    break
                batch, self._pending = self._pending, []
                data = b"".join(frame for frame, *_ in batch)
                sync = any(future is not None for _, future, _, _ in batch)
                await loop.run_in_executor(self._executor, _append, self._fd, data, sync)
                self.size += len(data)
                for _, future, op, then in batch:
                    result = then(op) if then is not None else None
                    if future is not None:
                        _settle(future, result=result)
                batch = []
                if self.size > self._compact_threshold:
                    await self._compact(loop)
        except BaseException as exc:
            # A failed compaction fails the journal too: the rename may have happened,
            # and appending to the old file would then lose data.
            self._failed = exc
            self._rewrite_wanted = False
            if is_disk_full(exc):
                log.warning("journal %s: %s; durable writes fail until there is room", self.path, exc)
            else:
                log.error("journal %s failed; it is rewritten from memory with the next write: %r", self.path, exc)
            error = self._error(exc)
            for _, future, _, _ in batch:
                if future is not None:
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
                for _, future, _, _ in batch:
                    if future is not None:
                        _settle(future, exc=self._error(self._failed))

    async def _rewrite_failed(self, loop: asyncio.AbstractEventLoop) -> None:
        """Replace a failed journal's file by the owner's snapshot (module docstring)."""
        self._rewrite_wanted = False
        snapshot = b"".join(encode_frame(op) for op in self._snapshot())  # on the loop, with the state
        self._fd = await loop.run_in_executor(self._executor, self._rewrite, snapshot)
        self.size = len(snapshot)
        self._compact_threshold = max(self._compact_bytes, 2 * len(snapshot))
        self._failed = None
        log.warning("journal %s: rewritten from memory (%d bytes) after the failure; taking writes again",
                    self.path, self.size)

    async def _compact(self, loop: asyncio.AbstractEventLoop) -> None:
        # Encoded on the loop, where the owner's state lives; written in the executor.
        snapshot = b"".join(encode_frame(op) for op in self._snapshot())
        if self.size > 2 * len(snapshot):
            fd = await loop.run_in_executor(self._executor, self._rewrite, snapshot)
            log.info("compacted %s from %d to %d bytes", self.path, self.size, len(snapshot))
            self._fd, self.size = fd, len(snapshot)
        self._compact_threshold = max(self._compact_bytes, 2 * len(snapshot))

    def _rewrite(self, snapshot: bytes) -> int:
        write_atomic(self.path, snapshot)
        fd = _open_journal(self.path)
        if self._fd >= 0:
            os.close(self._fd)
        return fd

    # -- open and recovery ---------------------------------------------------
    def _open(self) -> int:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_directory(directory.parent)
        for leftover in directory.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # an unfinished compaction: the journal is intact
        created = not self.path.exists()
        fd = _open_journal(self.path)
        if created:
            fsync_directory(directory)  # else a power loss could drop the file and what it holds
        return fd

    def _recover(self, apply: Callable[[dict], Any]) -> int:
        data = self.path.read_bytes()
        position = 0
        while (frame := decode_frame(data, position)) is not None:
            op, end = frame
            try:
                apply(op)
            except (KeyError, TypeError, ValueError):
                break
            position = end
        if position < len(data):
            log.warning("journal %s: truncated at position %d, cutting %d bytes of torn or corrupt data",
                        self.path, position, len(data) - position)
            os.ftruncate(self._fd, position)
            os.fsync(self._fd)
        return position


# -- frames ------------------------------------------------------------------
def encode_frame(op: dict) -> bytes:
    payload = json.dumps(op, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_frame(data: bytes, position: int) -> tuple[dict, int] | None:
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


def _append(fd: int, data: bytes, sync: bool) -> None:
    """Executor job: one write (looping only on a short write) and one fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if sync:
        os.fsync(fd)


def _settle(future: asyncio.Future, *, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled; the operation itself still happened
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
