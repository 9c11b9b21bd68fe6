"""streamd's storage engine: partition logs of record batches on local disk.

``PartitionLog`` is the interface the broker uses; ``Segment``, ``OffsetIndex`` and
``TimeIndex`` are its parts; ``batch`` is the stored frame format; ``recovery`` loads a
directory after a clean or unclean stop; ``checkpoint.write_atomic`` writes small state
files crash-safely. Imports only the standard library and numpy.
"""

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
    "InvalidBatch",
    "LogClosed",
    "LogFailed",
    "LogStats",
    "OffsetIndex",
    "OffsetOutOfRange",
    "PartitionLog",
    "ReadResult",
    "RecoveryPoint",
    "RecoveryReport",
    "Segment",
    "StorageError",
    "TimeIndex",
    "disk_full_as",
    "fsync_directory",
    "is_disk_full",
    "write_atomic",
]
