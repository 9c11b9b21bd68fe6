"""Deciding what a produce request appends to one partition, before anything is.

``plan_partition`` runs every append-time check that needs partition state —
idempotent producers' sequences (``producer_state``) and idempotency keys
(``dedup``) — without changing any state, so a request refused for one partition
appends nothing anywhere (``Broker.append``'s contract). ``PartitionPlan.result``
turns what ``Partition.append`` did into the answer.

A plan is one of:

- **append** the checked batches (the fast path when no batch carries a producer id
  and the topic has no dedup window: the list is used as it is);
- **duplicate**: every batch is an idempotent producer's retry of batches appended
  before; nothing is appended, and the answer repeats where they went. A request
  mixing retried and new batches for one partition is refused (no answer could
  describe it), as are retries whose originals are not adjacent in the log;
- on dedup topics, records whose key was appended within the window (or earlier in
  the same request: the first wins) are dropped from their batch, which is rebuilt
  without them, and listed with the offset of the first record with their key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .batches import CheckedBatch, rebuild_without
from .errors import InvalidBatch
from .producer_state import BatchMeta

if TYPE_CHECKING:
    from .partition import Partition


class ProduceResult(NamedTuple):
    partition: int
    base_offset: int
    record_count: int
    append_time_ms: int
    durable: bool
    #: An idempotent producer's retry: nothing appended; where it went the first time.
    duplicate: bool = False
    #: (index among the partition's records in the request, offset of the first
    #: record with the same idempotency key) for records not appended.
    deduplicated: tuple[tuple[int, int], ...] = ()


class RequestState:
    """What earlier batches of the same request claimed (they are not appended yet)."""

    __slots__ = ("expected", "keys")

    def __init__(self) -> None:
        #: (partition, producer id) -> next sequence after this request's batches
        self.expected: dict[tuple[int, int], int] = {}
        #: (partition, key) -> (plan, ordinal of the record among the plan's stored ones)
        self.keys: dict[tuple[int, str], tuple[PartitionPlan, int]] = {}


class PartitionPlan:
    __slots__ = ("part", "batches", "duplicates", "deduplicated", "needs_snapshot", "base_offset")

    def __init__(self, part: "Partition", batches: list[CheckedBatch]) -> None:
        self.part = part
        self.batches = batches
        #: Producer retries answered from memory (then ``batches`` is empty).
        self.duplicates: list[BatchMeta] = []
        #: (index among this entry's records, offset, or (plan, ordinal) for a key
        #: first seen earlier in the same request)
        self.deduplicated: list[tuple[int, object]] = []
        #: An idempotent batch lost every record to the dedup window: only the
        #: producer's sequence moves, which only the snapshot file can keep.
        self.needs_snapshot = False
        #: Where the plan's first stored record went (set once appended).
        self.base_offset = -1

    def durable_offset(self, base_offset: int, record_count: int) -> int:
        """Everything below this offset must be fsynced before answering (fsync=always)."""
        end = base_offset + record_count
        for meta in self.duplicates:
            end = max(end, meta.base_offset + meta.record_count)
        for _, where in self.deduplicated:
            end = max(end, _offset(where) + 1)
        return end

    def result(self, base_offset: int, record_count: int, append_time_ms: int, durable: bool) -> ProduceResult:
        if not self.duplicates and not self.deduplicated:
            return ProduceResult(self.part.index, base_offset, record_count, append_time_ms, durable)
        if self.duplicates:
            first, last = self.duplicates[0], self.duplicates[-1]
            base_offset, append_time_ms = first.base_offset, last.append_time_ms
            record_count = sum(m.record_count for m in self.duplicates)
        dedup = tuple((index, _offset(where)) for index, where in self.deduplicated)
        return ProduceResult(self.part.index, base_offset, record_count, append_time_ms, durable,
                             bool(self.duplicates), dedup)


def _offset(where: object) -> int:
    if isinstance(where, int):
        return where
    plan, ordinal = where  # type: ignore[misc]
    return plan.base_offset + ordinal


def plan_partition(
    part: "Partition", batches: list[CheckedBatch], request: RequestState, *, topic: str, now_ms: int
) -> PartitionPlan:
    """Check ``batches`` for ``part`` (see module docstring); raises what refuses them."""
    dedup = part.dedup
    plan = PartitionPlan(part, batches)
    if dedup is None:
        for b in batches:
            if b.producer_id:
                break
        else:
            return plan  # the fast path: nothing to decide
    fresh: list[CheckedBatch] = []
    retried: list[tuple[CheckedBatch, BatchMeta]] = []
    for b in batches:
        if b.producer_id:
            slot = (part.index, b.producer_id)
            meta = part.producers.check(
                b.producer_id, b.base_sequence, b.record_count, expected=request.expected.get(slot),
                relaxed=dedup is not None, topic=topic, partition=part.index,
            )
            if meta is not None:
                retried.append((b, meta))
                continue
            request.expected[slot] = b.base_sequence + b.record_count
        fresh.append(b)
    if retried:
        if fresh:
            raise InvalidBatch("a request mixes retried and new batches of an idempotent producer for one "
                               "partition; send the new ones in another request", partition=part.index)
        _plan_duplicates(plan, retried)
        return plan
    if dedup is not None:
        plan.batches = _drop_duplicate_keys(plan, fresh, request, now_ms)
    return plan


def _plan_duplicates(plan: PartitionPlan, retried: list[tuple[CheckedBatch, BatchMeta]]) -> None:
    plan.batches = []
    index = 0
    for i, (b, meta) in enumerate(retried):
        if i:
            prev = retried[i - 1][1]
            if meta.base_offset != prev.base_offset + prev.record_count:
                raise InvalidBatch("retried batches whose originals are not adjacent in the log; retry them "
                                   "one request each", partition=plan.part.index)
        plan.duplicates.append(meta)
        if meta.record_count != b.record_count and b.keys is not None and plan.part.dedup is not None:
            plan.deduplicated.extend(_retried_dedup(plan.part.dedup, b.keys, meta, index))
        index += b.record_count


def _retried_dedup(dedup, keys: list[str], meta: BatchMeta, index: int) -> list[tuple[int, object]]:
    """Which records of a retried batch the window dropped the first time (the answer
    is not kept; it is worked out again from the keys, which the window still holds:
    a stored record's key points at its own offset, a dropped one's elsewhere)."""
    out: list[tuple[int, object]] = []
    cursor = meta.base_offset
    for i, key in enumerate(keys):
        offset = dedup.offset_of(key) if key else None
        if offset is None or offset == cursor:
            cursor += 1
        else:
            out.append((index + i, offset))
    return out


def _drop_duplicate_keys(
    plan: PartitionPlan, batches: list[CheckedBatch], request: RequestState, now_ms: int
) -> list[CheckedBatch]:
    dedup = plan.part.dedup
    p = plan.part.index
    out: list[CheckedBatch] = []
    index = ordinal = 0
    for b in batches:
        keys = b.keys
        if keys is None:
            out.append(b)
            index += b.record_count
            ordinal += b.record_count
            continue
        keep: list[int] = []
        for i, key in enumerate(keys):
            if key:
                first = request.keys.get((p, key))
                if first is None:
                    offset = dedup.lookup(key, now_ms)
                    if offset is not None:
                        plan.deduplicated.append((index + i, offset))
                        continue
                    request.keys[(p, key)] = (plan, ordinal)
                else:
                    plan.deduplicated.append((index + i, first))
                    continue
            keep.append(i)
            ordinal += 1
        index += len(keys)
        if len(keep) == len(keys):
            out.append(b)
        elif keep or b.producer_id:
            rebuilt = rebuild_without(b, keep)
            if not keep:
                plan.needs_snapshot = True
            out.append(rebuilt)
    return out
