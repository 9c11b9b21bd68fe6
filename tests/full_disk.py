"""Helpers for full-disk tests: produce through the SDK until the disk is full, read
everything back, and the one answer a full disk may give.

    acked, errors = produce_until_full(address, "t", partitions=2)
    assert set(errors) == {DISK_FULL} and read_all(address, "t") == acked
"""

from __future__ import annotations

from pathlib import Path

from streamd.client import Consumer, Producer, StreamdError
from tests.fs import Ballast, fill

#: The only answer a produce (commit, settlement, ...) may get for lack of space.
DISK_FULL = ("RESOURCE_EXHAUSTED", "DISK_FULL")


def ballast_dirs(root: Path, count: int) -> list[Path]:
    """``count`` directories for ballast under ``root``, made while there is room (a
    full ext4 has none for a directory): ``@ballast0``, ... (the broker skips ``@``)."""
    dirs = [Path(root) / f"@ballast{i}" for i in range(count)]
    for d in dirs:
        d.mkdir()
    return dirs


def fill_into(directory: Path, *, leave_bytes: int = 0) -> Ballast:
    """``tests.fs.fill`` into ``directory`` (one of ``ballast_dirs``)."""
    return fill(directory, leave_bytes=leave_bytes)


def produce_until_full(address: str, topic: str, *, partitions: int, value_bytes: int = 16 << 10,
                       records: int = 4000, tag: str = "r") -> tuple[dict, list]:
    """Send ``records`` values (more than the disk holds) round the partitions with an
    idempotent SDK producer; ({(partition, offset): value} acknowledged, [(code,
    reason)] of every record that failed)."""
    acked: dict[tuple[int, int], bytes] = {}
    errors: list[tuple[str, str]] = []
    with Producer(address, linger_ms=2) as producer:
        sent = []
        for i in range(records):
            value = f"{tag}-{i}-".encode().ljust(value_bytes, b".")
            sent.append((value, producer.send(topic, value, partition=i % partitions)))
        producer.flush()
        for value, future in sent:
            try:
                meta = future.result(60)
            except StreamdError as exc:
                errors.append((exc.code, exc.reason))
                continue
            acked[(meta.partition, meta.offset)] = value
    return acked, errors


def read_all(address: str, topic: str) -> dict[tuple[int, int], bytes]:
    """Every record of ``topic``: {(partition, offset): value}."""
    with Consumer(address) as consumer:
        consumer.assign(topic)
        return {(r.partition, r.offset): r.value for r in consumer.records(exit_at_end=True)}
