"""Typed errors of the storage engine, each carrying structured fields.

The tree::

    StorageError                 root: everything ``segments`` raises on purpose
    +-- OffsetOutOfRange         a read below log_start_offset or past log_end_offset
    +-- CorruptBatch             a stored frame that fails to parse (or its CRC): names a file
    |                            and a byte position, for the broker's own log only
    +-- CorruptRecords           offsets first..last of a partition cannot be read (a corrupt
    |                            batch, a truncated segment); readers go on at next_offset
    +-- LogClosed                an operation on a closed PartitionLog
    +-- LogFailed                an fsync failed: the log refuses work until reopened
    +-- DiskFull                 no space (ENOSPC/EDQUOT, a short write); also an OSError:
                                 nothing of the operation was stored
    +-- InvalidBatch             an append the log cannot store (bad record count)
    +-- BatchTooLarge            a frame over ``batch.MAX_FRAME_BYTES``

The service layer maps these to gRPC codes in one table; nothing here knows about gRPC.
Messages name the partition when the log was opened with ``name``/``topic``/``partition``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

#: The errnos that mean "no room": out of blocks or inodes, or over a quota.
DISK_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the filesystem has no room (``DiskFull`` or a raw OSError)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class StorageError(Exception):
    """Root of the storage engine's errors."""


class OffsetOutOfRange(StorageError):
    """``offset`` is outside ``[log_start_offset, log_end_offset]``."""

    def __init__(
        self,
        offset: int,
        log_start_offset: int,
        log_end_offset: int,
        *,
        topic: str | None = None,
        partition: int | None = None,
        name: str | None = None,
    ) -> None:
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset
        self.topic = topic
        self.partition = partition
        self.name = name
        where = f" in {name}" if name else ""
        super().__init__(
            f"offset {offset} is out of range{where}: valid offsets are "
            f"{log_start_offset} to {log_end_offset}"
        )


class CorruptBatch(StorageError):
    """The frame at byte ``position`` of ``path`` is not a valid stored batch."""

    def __init__(self, path: Path | str, position: int, reason: str) -> None:
        self.path = Path(path)
        self.position = position
        self.reason = reason
        super().__init__(f"corrupt batch in {path} at position {position}: {reason}")


class CorruptRecords(StorageError):
    """Offsets ``first_offset .. last_offset`` of a partition cannot be read: a stored
    batch failed its checksum or its header is garbled, or a segment file ends before
    its last offset. ``next_offset`` (= ``last_offset + 1``) is the first offset after
    them that can be read again. The message names offsets only, never a file or a
    byte position (``PartitionLog`` logs those on the broker)."""

    def __init__(
        self,
        first_offset: int,
        last_offset: int,
        cause: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        name: str | None = None,
    ) -> None:
        self.first_offset = first_offset
        self.last_offset = last_offset
        self.next_offset = last_offset + 1
        self.cause = cause
        self.topic = topic
        self.partition = partition
        self.name = name
        where = f"{name}: " if name else ""
        super().__init__(
            f"{where}offsets {first_offset}..{last_offset} cannot be read ({cause}); "
            f"the next readable offset is {self.next_offset}"
        )

    def named(self, *, topic: str | None, partition: int | None, name: str | None) -> CorruptRecords:
        """The same error naming the partition it is in."""
        return CorruptRecords(self.first_offset, self.last_offset, self.cause, topic=topic,
                              partition=partition, name=name)


class LogFailed(StorageError):
    """An fsync of the partition log failed. After a failed fsync Linux may have
    dropped the dirty pages (or kept them, marked clean, though they never reached the
    disk), so a retry could "succeed" without the data: the log refuses every call
    until it is opened again, which recovers it from disk (``recovery``: what it
    keeps past the last good fsync is checked and written again). The broker does
    that by itself (``Broker``'s repair job), no restart needed."""

    def __init__(self, directory: Path | str, cause: BaseException, name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name
        self.cause = cause
        super().__init__(f"partition log {name or directory} failed to fsync ({cause}); "
                         "it is recovered from disk before it takes more work")


class DiskFull(StorageError, OSError):
    """The filesystem had no room for ``what`` (e.g. "append 3 batches", "roll to a new
    segment"). Raised before anything of the operation is visible: a write that
    failed part-way is undone first. ``errno`` is ENOSPC (or EDQUOT), so code that
    checks an OSError's errno sees it as one; ``cause`` is the original error."""

    def __init__(self, what: str, *, name: str | None = None, cause: BaseException | None = None) -> None:
        code = cause.errno if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS else errno.ENOSPC
        where = f" for {name}" if name else ""
        OSError.__init__(self, code, f"no space left on the data directory's filesystem to {what}{where}")
        self.what = what
        self.name = name
        self.cause = cause

    def __str__(self) -> str:
        return self.strerror or "disk full"


class LogClosed(StorageError):
    """The partition log at ``directory`` was closed."""

    def __init__(self, directory: Path | str, name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name
        super().__init__(f"partition log {name or directory} is closed")


class InvalidBatch(StorageError):
    """An append that cannot be stored as given (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid batch: {reason}")


class BatchTooLarge(StorageError):
    """A frame of ``size`` bytes exceeds the format's limit of ``max_bytes``."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        super().__init__(f"batch frame of {size} bytes exceeds the limit of {max_bytes} bytes")


@contextlib.contextmanager
def disk_full_as(what: str, *, name: str | None = None) -> Iterator[None]:
    """Turn an OSError that says the disk is full, raised inside the block, into
    ``DiskFull(what)``; other errors pass unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(what, name=name, cause=exc) from exc
        raise
