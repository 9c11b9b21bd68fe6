"""streamd's storage engine: partition logs of record batches on local disk.

``PartitionLog`` is the interface the broker uses (the broker's ``Partition`` wraps
it; nothing else above storage touches it); ``Segment``, ``OffsetIndex`` and
``TimeIndex`` are its parts; ``batch`` is the stored frame format (public here as
``FrameHeader`` and ``iter_frames``); ``ReadLimits`` bounds a read; ``layout`` names
the files; ``recovery`` loads a directory after a clean or unclean stop;
``checkpoint.write_atomic`` writes small state files crash-safely; ``inspection``
reads a partition directory offline, read-only (``streamd inspect``). Imports only
the standard library and numpy.

Above ``segments`` only this package, ``segments.layout``, ``segments.checkpoint``
and ``segments.inspection`` are imported; ``batch``, ``segment``, ``index`` and
``recovery`` are internals (tests/unit/test_storage_face.py checks it).
"""

from .batch import FrameHeader, iter_frames
from .checkpoint import fsync_directory, write_atomic
from .errors import (
    BatchTooLarge,
    CorruptBatch,
    CorruptRecords,
    DiskFull,
    InvalidBatch,
    LogClosed,
    LogFailed,
    OffsetOutOfRange,
    StorageError,
    disk_full_as,
    is_disk_full,
)
from .index import OffsetIndex, TimeIndex
from .limits import ReadLimits
from .log import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    AppendInfo,
    DamagedOffsets,
    DeletedSegment,
    LogStats,
    PartitionLog,
    ReadResult,
)
from .recovery import RecoveryPoint, RecoveryReport
from .segment import Segment

__all__ = [
    "DEFAULT_INDEX_INTERVAL_BYTES",
    "AppendInfo",
    "BatchTooLarge",
    "CorruptBatch",
    "CorruptRecords",
    "DamagedOffsets",
    "DeletedSegment",
    "DiskFull",
    "FrameHeader",
    "InvalidBatch",
    "LogClosed",
    "LogFailed",
    "LogStats",
    "OffsetIndex",
    "OffsetOutOfRange",
    "PartitionLog",
    "ReadLimits",
    "ReadResult",
    "RecoveryPoint",
    "RecoveryReport",
    "Segment",
    "StorageError",
    "TimeIndex",
    "disk_full_as",
    "fsync_directory",
    "iter_frames",
    "is_disk_full",
    "write_atomic",
]
