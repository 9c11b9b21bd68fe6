"""Record batches as the wire and the log carry them: encoding, decoding, and
cutting stored batches by offset. The broker (queue admission, dead letters) and the
SDK (producer, consumers, queue receivers) both use it; neither owns it, so neither
imports the other for it. It depends on the generated wire types and lz4 only.

Encoding builds one RecordSet per batch (records added in C by upb); decoding
decompresses lz4 where the batch says so.

Every reader cuts stored batches by offset the same way, with ``batch_window``: a
Fetch or Subscribe answer may start with a batch holding offsets below the one asked
for, and a queue Receive answer carries whole stored batches around the leased
ranges (records of other workers, or already settled, sit in the same batches:
``record_runs``). A record's offset is its batch's ``base_offset`` plus its index in
the decoded RecordSet (offsets are dense within a batch); the index of an offset
outside the batch is never used (Python would read a negative one from the batch's
end).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from operator import attrgetter, itemgetter
from typing import TypeVar

import lz4.frame

from streamd.v1 import streamd_pb2 as pb

Headers = Sequence[tuple[str, bytes]]
T = TypeVar("T")

#: The largest offset (int64): the upper bound of a range that runs to the end.
MAX_OFFSET = 2**63 - 1


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
) -> Iterator[tuple[T, int, int, Sequence[pb.Record]]]:
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
