"""Records as the SDK hands them out, and batch encoding/decoding.

Encoding builds one RecordSet per batch (records added in C by upb); decoding walks a
FetchResponse's batches, decompressing lz4 where the batch says so.

Every reader cuts stored batches by offset the same way, with ``batch_window``: a Fetch
or Subscribe answer may start with a batch holding offsets below the one asked for
(``iter_batch``), and a queue Receive answer carries whole stored batches around the
leased ranges (records of other workers, or already settled, sit in the same batches:
``record_runs``). A record's
offset is its batch's ``base_offset`` plus its index in the decoded RecordSet (offsets
are dense within a batch); the index of an offset outside the batch is never used
(Python would read a negative one from the batch's end).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import TypeVar

import lz4.frame

from streamd.v1 import streamd_pb2 as pb

Headers = Sequence[tuple[str, bytes]]
T = TypeVar("T")

#: The largest offset (int64): the upper bound of a range that runs to the end.
MAX_OFFSET = 2**63 - 1


class RecordFields:
    """Key, value, headers and timestamp read from a decoded protobuf record (``_record``,
    with its batch's ``_append_time_ms``) when asked for, so a large answer costs one
    small object per record. ``key`` is None for a record produced without a key;
    ``timestamp_ms`` is the producer's timestamp, or the broker's append time when the
    producer set none."""

    __slots__ = ()
    _record: pb.Record
    _append_time_ms: int

    @property
    def value(self) -> bytes:
        return self._record.value

    @property
    def key(self) -> bytes | None:
        r = self._record
        return r.key if r.HasField("key") else None

    @property
    def timestamp_ms(self) -> int:
        return self._record.timestamp_ms or self._append_time_ms

    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((h.key, h.value) for h in self._record.headers)


class ConsumerRecord(RecordFields):
    """One record as read: topic, partition, offset, timestamp_ms, key, value, headers
    (a light view: see ``RecordFields``)."""

    __slots__ = ("topic", "partition", "offset", "_record", "_append_time_ms")

    def __init__(self, topic: str, partition: int, offset: int, record: pb.Record, append_time_ms: int) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._record = record
        self._append_time_ms = append_time_ms

    def _fields(self) -> tuple:
        return (self.topic, self.partition, self.offset, self.timestamp_ms, self.key, self.value, self.headers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConsumerRecord) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"ConsumerRecord(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"timestamp_ms={self.timestamp_ms}, key={self.key!r}, value={self.value[:64]!r}, headers={self.headers!r})"
        )


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where a produced record landed. ``duplicate``: it was not appended by this
    send because it already was — a retried batch the broker had (idempotent
    producer), or a record whose idempotency key the topic's dedup window had seen;
    ``offset`` is then where the first one went."""

    topic: str
    partition: int
    offset: int
    append_time_ms: int
    durable: bool
    duplicate: bool = False


COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "lz4": pb.COMPRESSION_LZ4}


def add_record(
    record_set: pb.RecordSet,
    value: bytes,
    key: bytes | None = None,
    headers: Headers | None = None,
    timestamp_ms: int = 0,
    idempotency_key: str | None = None,
) -> None:
    record = record_set.records.add(value=value, timestamp_ms=timestamp_ms)
    if key is not None:
        record.key = key
    if headers:
        record.headers.extend(pb.RecordHeader(key=k, value=v) for k, v in headers)
    if idempotency_key:
        record.idempotency_key = idempotency_key


def encode_batch(record_set: pb.RecordSet, compression: str = "none") -> pb.RecordBatch:
    payload = record_set.SerializeToString()
    if compression == "lz4":
        return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload))
    return pb.RecordBatch(compression=COMPRESSIONS[compression], records=payload)


def values_record_set(values: Iterable[bytes]) -> pb.RecordSet:
    """A RecordSet of keyless records with the given values."""
    record_set = pb.RecordSet()
    add = record_set.records.add
    for value in values:
        add(value=value)
    return record_set


def values_batch(values: Iterable[bytes], compression: str = "none") -> pb.RecordBatch:
    """A batch of keyless records with the given values (the bulk fast path)."""
    return encode_batch(values_record_set(values), compression)


def batch_records(batch: pb.RecordBatch) -> pb.RecordSet:
    payload = batch.records
    if batch.compression == pb.COMPRESSION_LZ4:
        payload = lz4.frame.decompress(payload)
    return pb.RecordSet.FromString(payload)


def batch_window(base_offset: int, count: int, first_offset: int, last_offset: int) -> tuple[int, int]:
    """Indexes ``lo, hi`` of the records of a batch (``count`` of them, from
    ``base_offset``) whose offsets lie in ``[first_offset, last_offset]``: they are
    ``records[lo:hi]``, none when ``lo == hi``. Both are clamped to ``0 .. count``, so
    a range that misses the batch (before or after it) never makes a negative index."""
    lo = first_offset - base_offset
    if lo < 0:
        lo = 0
    elif lo > count:
        lo = count
    hi = last_offset - base_offset + 1
    if hi > count:
        hi = count
    return lo, (hi if hi > lo else lo)


def record_runs(
    batches: Iterable[pb.RecordBatch], ranges: Iterable[tuple[int, int, T]]
) -> Iterator[tuple[T, int, int, list[pb.Record]]]:
    """The records of one partition's stored ``batches`` whose offsets lie in
    ``ranges`` (``(first_offset, last_offset, tag)``, both ends included), as runs
    ``(tag, offset of the run's first record, the batch's append_time_ms, records)``:
    one run per range and batch they share.

    - Runs come in offset order, whatever the order of ``batches`` and ``ranges``.
    - Each offset comes at most once: where ranges overlap, the range that starts
      first (then ends first) has it; a batch sent twice counts once.
    - An offset of a range held by no batch is not in any run (count the records of
      the runs to notice); records of a batch outside every range are never handed out.
    - A batch is decoded (and decompressed) once, and only if a range reaches it.

    ``batches`` must not overlap each other (a partition's stored batches never do).
    Per-record work is left to the caller (``enumerate(records, offset)``).
    """
    ordered = sorted(batches, key=_BASE)
    bases = [b.base_offset for b in ordered]
    decoded: list[Sequence[pb.Record] | None] = [None] * len(ordered)
    done = -1  # every offset up to here is handed out (or held by no batch)
    for first, last, tag in sorted(ranges, key=_BOUNDS):
        if first <= done:
            first = done + 1
        # The batch holding ``first`` is the last one based at or below it (of a batch
        # sent twice, the second copy: the first then starts past the records handed out).
        i = bisect_right(bases, first) - 1
        if i < 0:
            i = 0
        while first <= last and i < len(bases) and bases[i] <= last:
            base = bases[i]
            records = decoded[i]
            if records is None:
                records = decoded[i] = batch_records(ordered[i]).records
            lo, hi = batch_window(base, len(records), first, last)
            if lo < hi:
                # A list slice even of a whole batch: iterating it beats the container.
                yield tag, base + lo, ordered[i].append_time_ms, records[lo:hi]
                first = base + hi
            i += 1
        if last > done:
            done = last


_BASE = attrgetter("base_offset")
_BOUNDS = itemgetter(0, 1)


def iter_batch(batch: pb.RecordBatch, topic: str, partition: int, min_offset: int = 0) -> Iterator[ConsumerRecord]:
    """One stored batch's records at or after ``min_offset``, made one at a time: each
    record object can die as soon as the reader is done with it, before any GC pass
    sees it (so a whole batch is read from its container, not copied into a list)."""
    base = batch.base_offset
    append_time = batch.append_time_ms
    records = batch_records(batch).records
    lo, hi = batch_window(base, len(records), min_offset, MAX_OFFSET)
    for i, r in enumerate(records[lo:hi] if lo else records, base + lo):
        yield ConsumerRecord(topic, partition, i, r, append_time)


def decode_batches(
    batches: Iterable[pb.RecordBatch], topic: str, partition: int, min_offset: int = 0
) -> list[ConsumerRecord]:
    """Records of stored batches (a Fetch or Subscribe answer: ascending, as stored)
    as a list, skipping offsets below ``min_offset``."""
    return [r for batch in batches for r in iter_batch(batch, topic, partition, min_offset)]
