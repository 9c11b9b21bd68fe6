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
- **refused** (an exception) when any batch is, e.g. a sequence out of order, or
  the first batch of a producer new to the partition when its producer table is
  full of active producers (``TooManyProducers``; the new producers of earlier
  batches in the request count). Like every refusal here it refuses the whole
  request, the batches that would have fit included: an answer is per partition,
  and could not say that some of its batches were left out;
- on dedup topics, records whose key was appended within the window (or earlier in
  the same request: the first wins) are dropped from their batch, which is rebuilt
  without them, and listed with the offset of the first record with their key.

The answer to a retry repeats the first answer exactly, ``deduplicated`` included:
each idempotent batch's dropped records are remembered with it
(``BatchMeta.deduplicated``, see ``producer_state``). Where that answer is not known
(state rebuilt from the log) it is worked out from the window if the window can
still tell for sure (``_rebuilt_answer``), and the retry is refused with
``RetryAnswerUnknown`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .batches import CheckedBatch, rebuild_without
from .errors import InvalidBatch, RetryAnswerUnknown
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

    __slots__ = ("expected", "new_producers", "keys")

    def __init__(self) -> None:
        #: (partition, producer id) -> next sequence after this request's batches
        self.expected: dict[tuple[int, int], int] = {}
        #: partition -> producers new to it that this request's batches start
        self.new_producers: dict[int, int] = {}
        #: (partition, key) -> (plan, ordinal of the record among the plan's stored ones)
        self.keys: dict[tuple[int, str], tuple[PartitionPlan, int]] = {}


class PartitionPlan:
    __slots__ = ("part", "batches", "duplicates", "deduplicated", "answers", "needs_snapshot", "base_offset")

    def __init__(self, part: Partition, batches: list[CheckedBatch]) -> None:
        self.part = part
        self.batches = batches
        #: Producer retries answered from memory (then ``batches`` is empty).
        self.duplicates: list[BatchMeta] = []
        #: (index among this entry's records, offset, or (plan, ordinal) for a key
        #: first seen earlier in the same request)
        self.deduplicated: list[tuple[int, object]] = []
        #: Per entry of ``batches`` (when the window dropped any record): its own
        #: dropped records, (index among the batch's records, as in ``deduplicated``).
        self.answers: list[list[tuple[int, object]]] = []
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

    def batch_answers(self) -> list[tuple[tuple[int, int], ...]] | None:
        """What ``Partition.append`` remembers with each batch: its dropped records
        and the offsets answered. Call once ``base_offset`` is set (keys first seen
        earlier in the plan itself are counted from it)."""
        if not self.answers:
            return None
        return [tuple((index, _offset(where)) for index, where in answer) for answer in self.answers]

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
    assert isinstance(where, tuple)  # (the plan of the batch kept, ordinal of its record)
    plan, ordinal = where
    return int(plan.base_offset + ordinal)


def plan_partition(
    part: Partition, batches: list[CheckedBatch], request: RequestState, *, topic: str, now_ms: int
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
            expected = request.expected.get(slot)
            new_so_far = request.new_producers.get(part.index, 0)
            meta = part.producers.check(
                b.producer_id, b.base_sequence, b.record_count, now_ms=now_ms, expected=expected,
                new_in_request=new_so_far, relaxed=dedup is not None, topic=topic, partition=part.index,
            )
            if meta is not None:
                retried.append((b, meta))
                continue
            if expected is None and b.producer_id not in part.producers:
                request.new_producers[part.index] = new_so_far + 1
            request.expected[slot] = b.base_sequence + b.record_count
        fresh.append(b)
    if retried:
        if fresh:
            raise InvalidBatch("a request mixes retried and new batches of an idempotent producer for one "
                               "partition; send the new ones in another request", partition=part.index)
        _plan_duplicates(plan, retried, topic)
        return plan
    if dedup is not None:
        plan.batches = _drop_duplicate_keys(plan, fresh, request, now_ms)
    return plan


def _plan_duplicates(plan: PartitionPlan, retried: list[tuple[CheckedBatch, BatchMeta]], topic: str) -> None:
    plan.batches = []
    index = 0
    for i, (b, meta) in enumerate(retried):
        if i:
            prev = retried[i - 1][1]
            if meta.base_offset != prev.base_offset + prev.record_count:
                raise InvalidBatch("retried batches whose originals are not adjacent in the log; retry them "
                                   "one request each", partition=plan.part.index)
        plan.duplicates.append(meta)
        if meta.record_count != b.record_count:  # the window dropped records the first time
            answer = meta.deduplicated
            if answer is None:
                answer = _rebuilt_answer(plan.part.dedup, b.keys, meta)
            if answer is None:
                raise RetryAnswerUnknown(b.producer_id, b.base_sequence, topic=topic, partition=plan.part.index)
            plan.deduplicated.extend((index + j, offset) for j, offset in answer)
        index += b.record_count


def _rebuilt_answer(dedup, keys: list[str] | None, meta: BatchMeta) -> tuple[tuple[int, int], ...] | None:
    """Which records of a retried batch the window dropped the first time, worked out
    from the window's keys when the answer itself is not known; None unless exact.

    The window maps a key to the latest record stored with it (nothing else sets an
    offset). Walking the retry's records with ``cursor`` at the offset the next
    stored one would have: a record without a key was stored; one whose key maps to
    ``cursor`` was stored there; one whose key maps below ``cursor`` was dropped (had
    it been stored, the key would map to ``cursor`` or later) and was answered with
    that offset, the latest record with its key before it. A key the window no longer
    holds, or that maps past ``cursor`` (stored again since), cannot tell: None.
    """
    if dedup is None or keys is None:
        return None
    out: list[tuple[int, int]] = []
    cursor = meta.base_offset
    for i, key in enumerate(keys):
        offset = dedup.offset_of(key) if key else cursor
        if offset == cursor:
            cursor += 1
        elif offset is not None and offset < cursor:
            out.append((i, offset))
        else:
            return None
    if cursor != meta.base_offset + meta.record_count:
        return None
    return tuple(out)


def _drop_duplicate_keys(
    plan: PartitionPlan, batches: list[CheckedBatch], request: RequestState, now_ms: int
) -> list[CheckedBatch]:
    dedup = plan.part.dedup
    p = plan.part.index
    out: list[CheckedBatch] = []
    answers: list[list[tuple[int, object]]] = []  # kept aligned with ``out``
    index = ordinal = 0
    for b in batches:
        keys = b.keys
        if keys is None:
            out.append(b)
            answers.append([])
            index += b.record_count
            ordinal += b.record_count
            continue
        assert dedup is not None  # keys are collected only on topics with a dedup window
        keep: list[int] = []
        dropped: list[tuple[int, object]] = []
        for i, key in enumerate(keys):
            if key:
                first = request.keys.get((p, key))
                if first is None:
                    offset = dedup.lookup(key, now_ms)
                    if offset is not None:
                        dropped.append((i, offset))
                        continue
                    request.keys[(p, key)] = (plan, ordinal)
                else:
                    dropped.append((i, first))
                    continue
            keep.append(i)
            ordinal += 1
        plan.deduplicated.extend((index + i, where) for i, where in dropped)
        index += len(keys)
        if not dropped:
            out.append(b)
            answers.append([])
        elif keep or b.producer_id:
            rebuilt = rebuild_without(b, keep)
            if not keep:
                plan.needs_snapshot = True
            out.append(rebuilt)
            answers.append(dropped)
    if plan.deduplicated:
        plan.answers = answers
    return out
