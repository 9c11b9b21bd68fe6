"""The record accumulator (as in Kafka's clients): ``send()`` appends a record's
wire bytes (``_wire_records``) to its partition's open batch under one plain lock,
from any thread, with no thread hop and no future but the record's own small one
(``_futures``). The producer's event loop only takes whole batches.

State, all under ``lock``:

- ``open``: per (topic, partition) the batch records are added to. A batch is
  *sealed* (moved to ``sealed``, in order) when it reaches ``batch_max_bytes``, when a
  record would take it past that (the record starts the next one), when its
  ``linger_ms`` ran out (``linger_expired``) or on ``seal_all`` (flush);
- ``sealed``: batches waiting for the loop to hand them to the sender, oldest first;
  the loop takes them in that order (``take_sealed``), so a partition's batches reach
  the sender in the order their records were sent;
- ``topics``: what a topic lookup told (partition count, ``max_record_bytes``);
- ``deferred``: records sent while a topic they need was not looked up yet, oldest
  first. While any record is deferred, every later one is deferred too, so records
  keep their call order (the loop places them once the lookup answers: ``place``).

A record is checked before it joins a batch: over the topic's ``max_record_bytes``
(once known) it is refused at once, alone; a partition outside the topic's count
(once known) too. ``add`` returns flags telling the caller what the loop must do.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from streamd.partitioner import key_partition

from ._futures import BatchOutcome
from ._wire_records import too_large
from .errors import StreamdError

F = TypeVar("F")

#: ``add`` flags: a batch was opened (arm its linger timer) / sealed (hand it over) /
#: the first record was deferred (look its topic up).
OPENED, SEALED, DEFERRED = 1, 2, 4


class TopicInfo(NamedTuple):
    """What a topic lookup told; None: not known (the lookup was refused)."""

    partition_count: int | None
    max_record_bytes: int | None


class OpenBatch:
    __slots__ = ("topic", "partition", "parts", "count", "size", "outcome", "deadline", "timer")

    def __init__(self, topic: str, partition: int, outcome: BatchOutcome, deadline: float) -> None:
        self.topic = topic
        self.partition = partition
        self.parts: list[bytes] = []  # RecordSet entries' bytes; their join is the RecordSet
        self.count = 0
        self.size = 0
        self.outcome = outcome
        self.deadline = deadline  # delivery deadline of its first record (loop time)
        self.timer: asyncio.TimerHandle | None = None


class Deferred(NamedTuple):
    topic: str
    prefix: bytes
    value: bytes | None
    record_len: int
    key: bytes | None
    partition: int | None
    outcome: BatchOutcome
    deadline: float


class Accumulator:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, batch_max_bytes: int, delivery_timeout_s: float) -> None:
        self.lock = threading.Lock()
        self.loop = loop
        self.loop_thread: int | None = None  # set by the producer once known
        self.batch_max_bytes = batch_max_bytes
        self.delivery_timeout_s = delivery_timeout_s
        self.open: dict[tuple[str, int], OpenBatch] = {}
        self.sealed: deque[OpenBatch] = deque()
        self.topics: dict[str, TopicInfo] = {}
        self.deferred: deque[Deferred] = deque()
        self.sticky: dict[str, int] = {}

    def add(self, topic: str, prefix: bytes, value: bytes | None, record_len: int, key: bytes | None,
            partition: int | None, future_type: Callable[[BatchOutcome, int], F]) -> tuple[F, int, OpenBatch | None]:
        """Add one record (its RecordSet entry is ``prefix + value``; ``value`` None:
        all of it is in ``prefix``): returns its future, the flags and the batch it
        joined (None when deferred). Raises what ``_put`` raises."""
        with self.lock:
            info = self.topics.get(topic)
            if self.deferred or info is None or (partition is None and info.partition_count is None):
                outcome = BatchOutcome(topic, -1 if partition is None else partition, self.loop, self.loop_thread, 1)
                self.deferred.append(Deferred(topic, prefix, value, record_len, key, partition, outcome,
                                              self.loop.time() + self.delivery_timeout_s))
                return future_type(outcome, 0), (DEFERRED if len(self.deferred) == 1 else 0), None
            batch, index, flags = self._put(topic, prefix, value, record_len, key, partition, info)
        return future_type(batch.outcome, index), flags, batch

    def _put(self, topic: str, prefix: bytes, value: bytes | None, record_len: int, key: bytes | None,
             partition: int | None, info: TopicInfo, deadline: float | None = None) -> tuple[OpenBatch, int, int]:
        limit = info.max_record_bytes
        if limit is not None and record_len > limit:
            raise too_large(topic, record_len, limit, "the topic's max_record_bytes")
        count = info.partition_count
        if partition is None:
            assert count is not None
            if key is not None:
                partition = key_partition(key, count)
            else:
                sticky = self.sticky.get(topic)
                if sticky is None:
                    sticky = self.sticky[topic] = 0
                partition = sticky % count
        elif count is not None and partition >= count:
            raise StreamdError("INVALID_ARGUMENT", "PARTITION_OUT_OF_RANGE",
                               f"partition {partition} of {topic}: it has partitions 0 .. {count - 1}",
                               {"topic": topic, "partition": str(partition), "partition_count": str(count)})
        size = len(prefix) + (len(value) if value is not None else 0)
        flags = 0
        batch = self.open.get((topic, partition))
        if batch is not None and batch.size + size > self.batch_max_bytes:
            self._seal(batch)  # this record would take it past the limit: it starts the next one
            flags = SEALED
            batch = None
        if batch is None:
            batch = self.open[(topic, partition)] = OpenBatch(
                topic, partition, BatchOutcome(topic, partition, self.loop, self.loop_thread),
                self.loop.time() + self.delivery_timeout_s if deadline is None else deadline)
            flags |= OPENED
        elif deadline is not None and deadline < batch.deadline:
            batch.deadline = deadline  # a deferred record: its time runs from its send
        index = batch.count
        batch.count = index + 1
        batch.parts.append(prefix)
        if value is not None:
            batch.parts.append(value)
        batch.size += size
        if batch.size >= self.batch_max_bytes:
            self._seal(batch)
            flags |= SEALED
        return batch, index, flags

    def _seal(self, batch: OpenBatch) -> None:
        del self.open[(batch.topic, batch.partition)]
        batch.outcome.count = batch.count
        self.sealed.append(batch)
        if batch.topic in self.sticky:
            # Sticky round-robin: keyless records fill one partition's batch at a time.
            self.sticky[batch.topic] += 1

    # -- on the loop ----------------------------------------------------------
    def linger_expired(self, batch: OpenBatch) -> bool:
        """Seal ``batch`` if it is still open; whether it was."""
        with self.lock:
            batch.timer = None
            if self.open.get((batch.topic, batch.partition)) is not batch:
                return False
            self._seal(batch)
            return True

    def seal_all(self) -> None:
        with self.lock:
            for batch in list(self.open.values()):
                self._seal(batch)

    def take_sealed(self) -> OpenBatch | None:
        with self.lock:
            return self.sealed.popleft() if self.sealed else None

    def head_deferred(self) -> Deferred | None:
        with self.lock:
            return self.deferred[0] if self.deferred else None

    def place(self, record: Deferred, info: TopicInfo | None) -> list[tuple[int, OpenBatch]]:
        """Place the oldest deferred record (``record``) into its batch, now that its
        topic is looked up (``info``; None: the lookup failed, as the caller tells
        ``record.outcome``), then every deferred record after it whose topic is known
        (in one go: a sender keeps adding while this runs). Returns the flags and
        batch of each record that asks something of the loop."""
        woken: list[tuple[int, OpenBatch]] = []
        refused: list[tuple[Deferred, StreamdError]] = []
        with self.lock:
            if not self.deferred or self.deferred[0] is not record:
                return woken
            self.deferred.popleft()
            if info is not None:
                self._place(record, info, woken, refused)
            while self.deferred:
                head = self.deferred[0]
                known = self.topics.get(head.topic)
                if known is None or (head.partition is None and known.partition_count is None):
                    break
                self.deferred.popleft()
                self._place(head, known, woken, refused)
        for failed, exc in refused:  # outside the lock: their callbacks may send again
            failed.outcome.fail(exc)
        return woken

    def _place(self, record: Deferred, info: TopicInfo, woken: list[tuple[int, OpenBatch]],
               refused: list[tuple[Deferred, StreamdError]]) -> None:
        try:
            batch, index, flags = self._put(record.topic, record.prefix, record.value, record.record_len,
                                            record.key, record.partition, info, record.deadline)
        except StreamdError as exc:
            refused.append((record, exc))
            return
        batch.outcome.link(index, record.outcome)
        if flags:
            woken.append((flags, batch))

    def fail_deferred(self, exc: BaseException) -> None:
        with self.lock:
            records, self.deferred = list(self.deferred), deque()
        for record in records:
            record.outcome.fail(exc)


def encode(batch: OpenBatch) -> bytes:
    """The RecordSet of ``batch``, serialized."""
    return b"".join(batch.parts)


__all__ = ["DEFERRED", "OPENED", "SEALED", "Accumulator", "Deferred", "OpenBatch", "TopicInfo", "encode"]
