"""The documented partitioner, shared by the broker and the SDK.

A record with a key goes to ``CRC-32(key) mod partition_count`` where CRC-32 is the
IEEE polynomial as computed by zlib (Go ``hash/crc32.ChecksumIEEE``, Java
``java.util.zip.CRC32``, Node ``zlib.crc32``), read as an unsigned 32-bit number.
Records without a key are spread round-robin: the broker rotates per record; the SDK
rotates per batch (all keyless records of one batch go to one partition, then the
next batch goes to the next partition), which keeps batches large.
"""

from __future__ import annotations

import zlib


def key_partition(key: bytes, partition_count: int) -> int:
    return zlib.crc32(key) % partition_count
