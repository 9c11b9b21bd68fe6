"""The selection layer of ``streamd replay`` (pure, no I/O): which offsets of which
partitions, and which records among them.

``parse_position`` reads ``--from``/``--to``; ``requested_offsets`` turns them into one
offset per partition (time lookups injected); ``resolve_ranges`` clamps those to the
partitions' bounds, giving one ``PartitionRange`` [start, stop) each; ``select`` picks,
from one partition's records in offset order, those in range that pass a
``RecordFilter`` (exact key, every wanted header).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from .common import parse_time

_PER_PARTITION = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


# -- selection ---------------------------------------------------------------
@dataclass(frozen=True)
class Offset:
    offset: int


@dataclass(frozen=True)
class Time:
    timestamp_ms: int


@dataclass(frozen=True)
class PerPartition:
    offsets: Mapping[int, int]


Position = Offset | Time | PerPartition


def parse_partition_offsets(text: str) -> dict[int, int]:
    """``"0:12,2:7"`` -> {0: 12, 2: 7}."""
    if not _PER_PARTITION.match(text.strip()):
        raise ValueError(f"expected PARTITION:OFFSET[,PARTITION:OFFSET...], got {text!r}")
    pairs = (item.split(":") for item in text.strip().split(","))
    return {int(p): int(o) for p, o in pairs}


def parse_position(text: str) -> Position:
    """An offset ("42"), per-partition offsets ("0:42,1:7"), else a time (@epoch_ms, ISO-8601)."""

    text = text.strip()
    if text.isdigit():
        return Offset(int(text))
    if _PER_PARTITION.match(text):
        return PerPartition(parse_partition_offsets(text))
    try:
        return Time(parse_time(text))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as an offset, PARTITION:OFFSET list or time") from None


def requested_offsets(
    position: Position | None,
    partitions: Iterable[int],
    *,
    default: Mapping[int, int],
    offsets_for_time: Callable[[int], Mapping[int, int]],
) -> dict[int, int]:
    """One requested offset per partition (``default`` where the position names none)."""
    partitions = list(partitions)
    if position is None:
        return {p: default[p] for p in partitions}
    if isinstance(position, Offset):
        return {p: position.offset for p in partitions}
    if isinstance(position, PerPartition):
        return {p: position.offsets.get(p, default[p]) for p in partitions}
    found = offsets_for_time(position.timestamp_ms)
    return {p: found[p] for p in partitions}


@dataclass(frozen=True)
class PartitionRange:
    """Offsets [start, stop) of one partition; ``start == stop`` when nothing is selected."""

    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def resolve_ranges(
    bounds: Mapping[int, tuple[int, int]],
    starts: Mapping[int, int],
    stops: Mapping[int, int],
    *,
    resume: Mapping[int, int] | None = None,
) -> tuple[list[PartitionRange], list[str]]:
    """Clamp requested offsets to each partition's (log_start_offset, log_end_offset).

    ``resume`` overrides ``starts`` per partition. A start below the log start moves up to
    it; a stop past the log end (as it was when the replay began) moves down to it. Returns
    the ranges in partition order and a note for each clamp.
    """
    ranges, notes = [], []
    for p in sorted(starts):
        log_start, log_end = bounds[p]
        start = (resume or {}).get(p, starts[p])
        stop = stops[p]
        if start < log_start:
            notes.append(f"partition {p}: offset {start} is below the log start; starting at {log_start}")
            start = log_start
        if stop > log_end:
            notes.append(f"partition {p}: stop offset {stop} is past the log end; stopping at {log_end}")
            stop = log_end
        ranges.append(PartitionRange(p, start, max(start, stop)))
    return ranges, notes


@dataclass(frozen=True)
class RecordFilter:
    """Exact key (None: any) and headers that must all be present (same name and value)."""

    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def selects_all(self) -> bool:
        return self.key is None and not self.headers

    def matches(self, record) -> bool:
        if self.key is not None and record.key != self.key:
            return False
        if self.headers:
            have = record.headers
            return all(h in have for h in self.headers)
        return True


def select(
    records: Iterable,
    *,
    from_offset: int = 0,
    to_offset: int | None = None,
    key: bytes | None = None,
    headers: Iterable[tuple[str, bytes]] = (),
) -> Iterator:
    """The records of one partition, given in offset order, that lie in [from_offset,
    to_offset) and match; stops reading at the first offset at or past ``to_offset``."""
    wanted = RecordFilter(key, tuple(headers))
    for record in records:
        if to_offset is not None and record.offset >= to_offset:
            return
        if record.offset >= from_offset and wanted.matches(record):
            yield record


# -- I/O: reading -------------------------------------------------------------------------
