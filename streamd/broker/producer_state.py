"""Idempotent producers: what one partition remembers of each producer, so that a
retried batch is answered with its original offsets instead of being appended twice.

A producer (``RecordBatch.producer_id`` != 0, from ``InitProducer``) numbers its
records 0, 1, 2, ... per partition; a batch carries the number of its first record
(``base_sequence``). Per producer the table keeps the next sequence it expects and
the last ``REMEMBERED_BATCHES`` batches appended (``BatchMeta``). A batch is

- appended when its base sequence is the next expected one (0 for a new producer);
- a duplicate when it is one of the remembered batches: nothing is appended and the
  answer repeats the original base offset and append time;
- refused otherwise (``OutOfOrderSequence``: a gap, or a sequence too old to be
  remembered; ``UnknownProducer`` for an unknown id not starting at 0).

Invariants: a producer's remembered batches are in sequence order and contiguous,
the last one ending at ``next_sequence``; producers are kept in order of their last
append (least recent first), and one idle for ``PRODUCER_EXPIRY_MS`` is dropped by
``expire``. Not thread-safe: the event-loop thread owns it.

**At most ``max_producers`` producers** (memory), and which ones go must not be up
to other clients: anyone can send batches under producer ids nobody issued, and a
producer forgotten too early has the retry of its first batch appended twice (and
its later batches refused, ``UnknownProducer``). So a full table makes room for a
new producer (no state here, ``base_sequence`` 0) only by evicting producers idle
for at least ``PRODUCER_MIN_IDLE_MS`` (least recent first); when there are not
enough of them, ``check`` refuses the new producer's batch (``TooManyProducers``)
before anything is appended, counting new producers of earlier batches of the same
request too. Producers the table holds keep their guarantees whatever others send
(Kafka's KIP-936 throttles new producer ids for the same reason). Only rebuilding
(``replay``: the log is the truth, nothing can be refused) evicts the least recent
producer whatever its age. The table can exceed ``max_producers`` in one corner: a
request whose new producers were admitted against idle producers that append in
the same request (no longer idle when the new ones are recorded); ``record`` then
keeps the new ones rather than evict an active producer, and later new producers
are refused until idle producers make up the difference.

**Where it comes from after a restart.** The stored body of every batch keeps the
producer's ``producer_id`` and ``base_sequence`` (``segments.batch``: the bytes after
the 34-byte header), so the table can always be rebuilt from the log. To keep
start-up cheap, a snapshot of the table is written next to the partition's segments
at each checkpoint (and on a clean stop), and opening loads it and replays only the
batches stored after the offset it covers.

Snapshot file ``producers.snapshot`` (written with ``write_atomic``; little-endian)::

    magic "SDPS", u16 version (2), i64 covers_offset, u32 producer_count,
    then per producer: u64 producer_id, i64 last_append_ms, i64 next_sequence,
                       u8 batch_count, then per batch:
                       i64 base_sequence, u32 sequence_count, i64 base_offset,
                       u32 record_count, i64 append_time_ms,
                       u32 deduplicated_count (0xFFFFFFFF: not known), then per entry:
                       u32 index, i64 offset
    u32 CRC-32 of everything before it.

Version 1 (written before answers were kept) is the same without
``deduplicated_count`` and its entries; it is still read, every answer "not known".

``covers_offset``: the table reflects every batch below it and none at or after it.
It is written only after the log is fsynced up to that offset, so it never runs ahead
of what a crash keeps; a snapshot that does (a damaged log cut by recovery), or that
fails its checksum, is ignored and the table is rebuilt from the whole log.

On topics with a dedup window a batch may be stored with fewer records than it had
sequence numbers (records whose idempotency key was a duplicate are dropped). The
stored copy then carries ``base_sequence`` shifted so that it still *ends* at the
batch's last sequence number; a rebuilt table therefore has the right next sequence,
and on such topics a retry is recognised by where it ends (``relaxed`` matching).

**The answer to such a retry** must repeat which records were dropped and the offset
each was answered with (``BatchMeta.deduplicated``); the window cannot tell once it
forgot the keys, so the answer is kept with the batch and in the snapshot. The log
keeps only the stored records, so a batch replayed from it (no snapshot, or stored
after the one on disk: an unclean stop) has its answer "not known" (None), as have
answers forgotten to bound memory (``max_answer_entries``). For those the planner
works the answer out from the window only where that is exact, and otherwise
refuses the retry (``RetryAnswerUnknown``) rather than answer wrongly
(``append_plan``).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from segments import PartitionLog
from segments.checkpoint import write_atomic

from .errors import InvalidBatch, OutOfOrderSequence, TooManyProducers, UnknownProducer
from .log_scan import iter_batches, producer_fields

log = logging.getLogger("streamd.broker")

SNAPSHOT_FILE = "producers.snapshot"
REMEMBERED_BATCHES = 5
MAX_PRODUCERS = 10_000
PRODUCER_EXPIRY_MS = 7 * 24 * 3600 * 1000
#: How long a producer must have been idle before a full table evicts it for a new
#: one. Far longer than any client keeps retrying a batch (the SDK: its
#: delivery_timeout_ms, 120 s by default), so no retry finds its producer evicted; short enough that producers
#: gone for good make room within the quarter hour rather than the 7 days of
#: ``PRODUCER_EXPIRY_MS``.
PRODUCER_MIN_IDLE_MS = 15 * 60 * 1000
MAX_SEQUENCE = (1 << 63) - 1
#: Entries of remembered dedup answers (``BatchMeta.deduplicated``) one table keeps in
#: all; past it the answers of the least recent producers are forgotten (None). One
#: answer holds at most one entry per record of its batch, and a dropped record takes
#: at least 5 bytes of the batch's uncompressed records (a keyed ``Record`` inside a
#: ``RecordSet``), which ``checked_batch`` caps at ``max_batch_bytes``: a single answer
#: is at most ``max_batch_bytes / 5`` entries (~800k at the 4 MiB default), and the
#: whole table at most this many, ~120 bytes each in memory: ~12 MB per partition at
#: worst (the dedup window itself may hold far more).
MAX_ANSWER_ENTRIES = 100_000

_MAGIC = b"SDPS"
_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_HEAD = struct.Struct("<4sHqI")
_PRODUCER = struct.Struct("<QqqB")
_BATCH = struct.Struct("<qIqIq")
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<Iq")
_NOT_KNOWN = 0xFFFFFFFF
_CRC = struct.Struct("<I")


class BatchMeta(NamedTuple):
    """One appended batch of a producer, as remembered."""

    base_sequence: int
    sequence_count: int  # sequence numbers the batch used (records the producer sent)
    base_offset: int
    record_count: int  # records stored (fewer when a dedup window dropped some)
    append_time_ms: int
    #: The records the dedup window dropped, as answered the first time: (index among
    #: the records the producer sent, offset of the first record with its key). None:
    #: not known (see "The answer to such a retry" above).
    deduplicated: tuple[tuple[int, int], ...] | None = ()

    @property
    def end_sequence(self) -> int:
        return self.base_sequence + self.sequence_count


def _answer_size(meta: BatchMeta) -> int:
    return len(meta.deduplicated) if meta.deduplicated else 0


class ProducerEntry:
    __slots__ = ("batches", "next_sequence", "last_append_ms")

    def __init__(self) -> None:
        self.batches: deque[BatchMeta] = deque(maxlen=REMEMBERED_BATCHES)
        self.next_sequence = 0
        self.last_append_ms = 0


class ProducerStateTable:
    """Per-producer sequence state of one partition (see module docstring)."""

    def __init__(self, *, max_producers: int = MAX_PRODUCERS, max_answer_entries: int = MAX_ANSWER_ENTRIES,
                 min_idle_ms: int = PRODUCER_MIN_IDLE_MS) -> None:
        self.max_producers = max_producers
        self.max_answer_entries = max_answer_entries
        self.min_idle_ms = min_idle_ms
        #: A scan for idle producers, resumed while the table is unchanged (``_idle_at_least``).
        self._idle_scan: _IdleScan | None = None
        self._producers: OrderedDict[int, ProducerEntry] = OrderedDict()
        #: Entries of the answers remembered (bounded by ``max_answer_entries``).
        self.answer_entries = 0
        #: Bumped on every change; the owner compares it to decide whether to snapshot.
        self.version = 0

    def __len__(self) -> int:
        return len(self._producers)

    def __contains__(self, producer_id: int) -> bool:
        return producer_id in self._producers

    def entry(self, producer_id: int) -> ProducerEntry | None:
        return self._producers.get(producer_id)

    def next_sequence(self, producer_id: int) -> int | None:
        entry = self._producers.get(producer_id)
        return None if entry is None else entry.next_sequence

    # -- the append-time check -----------------------------------------------
    def check(
        self,
        producer_id: int,
        base_sequence: int,
        count: int,
        *,
        now_ms: int,
        expected: int | None = None,
        new_in_request: int = 0,
        relaxed: bool = False,
        topic: str | None = None,
        partition: int | None = None,
    ) -> BatchMeta | None:
        """None: append the batch. A ``BatchMeta``: the batch is a retry of that one.
        Raises ``OutOfOrderSequence`` (``UnknownProducer``) or, for a new producer the
        full table has no room for, ``TooManyProducers``. ``expected`` overrides the
        table's next sequence and ``new_in_request`` counts the new producers admitted
        for this partition by earlier batches of the same request (not yet appended)."""
        if base_sequence < 0 or base_sequence > MAX_SEQUENCE - count:
            raise InvalidBatch(f"base_sequence {base_sequence} is out of range", partition=partition)
        entry = self._producers.get(producer_id)
        if expected is None:
            expected = None if entry is None else entry.next_sequence
        if expected is None:
            if base_sequence != 0:
                raise UnknownProducer(producer_id, base_sequence, topic=topic, partition=partition)
            if not self.has_room(new_in_request + 1, now_ms):
                raise TooManyProducers(producer_id, self.max_producers, self.min_idle_ms,
                                       topic=topic, partition=partition)
            return None
        if base_sequence == expected:
            return None
        if entry is not None:
            end = base_sequence + count
            for meta in entry.batches:
                if meta.base_sequence == base_sequence and meta.sequence_count == count:
                    return meta
                if relaxed and meta.end_sequence == end and base_sequence < meta.base_sequence:
                    return meta  # stored with records dropped by the dedup window
        if base_sequence > expected:
            why = "a gap: batches before this one are missing"
        else:
            why = "not one of the last batches appended (too old, or another record count)"
        raise OutOfOrderSequence(producer_id, expected, base_sequence, topic=topic, partition=partition, why=why)

    def has_room(self, new_producers: int, now_ms: int) -> bool:
        """Whether ``new_producers`` new producers fit: in free places, or in those of
        producers idle for ``min_idle_ms`` (which ``record`` evicts for them)."""
        missing = new_producers - (self.max_producers - len(self._producers))
        return missing <= 0 or self._idle_at_least(missing, now_ms)

    def _idle_at_least(self, n: int, now_ms: int) -> bool:
        """Whether the ``n`` least recent producers have all been idle for
        ``min_idle_ms`` (idle ones come first: the table is in order of last append;
        should the clock step back, this only undercounts, refusing rather than
        letting ``record`` evict, which checks each producer's own age).
        The scan resumes where the last one stopped while the table and ``now_ms`` are
        unchanged, so a request of k new producers walks the idle ones once, not k times."""
        key = (self.version, len(self._producers), now_ms)
        scan = self._idle_scan
        if scan is None or scan.key != key:
            scan = self._idle_scan = _IdleScan(key, iter(self._producers.values()))
        limit = now_ms - self.min_idle_ms
        while scan.idle < n and not scan.done:
            entry = next(scan.entries, None)
            if entry is None or entry.last_append_ms > limit:
                scan.done = True
            else:
                scan.idle += 1
        return scan.idle >= n

    def record(self, producer_id: int, meta: BatchMeta, now_ms: int) -> None:
        """Remember an appended batch (``meta.base_sequence`` must be the expected one;
        a new producer must have passed ``check``). A new producer takes the place of
        producers idle for ``min_idle_ms`` while the table is full, never of an active
        one (see "At most ``max_producers``" above)."""
        self._remember(producer_id, meta, now_ms, evict_idle_before=now_ms - self.min_idle_ms)

    def _remember(self, producer_id: int, meta: BatchMeta, now_ms: int, *, evict_idle_before: int | None) -> None:
        """``evict_idle_before``: a full table evicts only producers whose last append
        is at or before it; None: the least recent, whatever its age (rebuilding)."""
        producers = self._producers
        entry = producers.get(producer_id)
        if entry is None:
            while len(producers) >= self.max_producers:
                evicted, gone = next(iter(producers.items()))
                if evict_idle_before is not None and gone.last_append_ms > evict_idle_before:
                    log.warning("producer state full (%d) and no producer idle for %d ms: keeping producer %d "
                                "over the limit", self.max_producers, self.min_idle_ms, producer_id)
                    break
                del producers[evicted]
                self._forgotten(gone)
                log.info("producer state full (%d): evicted producer %d", self.max_producers, evicted)
            entry = producers[producer_id] = ProducerEntry()
        else:
            producers.move_to_end(producer_id)
        batches = entry.batches
        if len(batches) == batches.maxlen:
            self.answer_entries -= _answer_size(batches[0])  # the append below pushes it out
        batches.append(meta)
        self.answer_entries += _answer_size(meta)
        entry.next_sequence = meta.end_sequence
        entry.last_append_ms = now_ms
        self.version += 1
        if self.answer_entries > self.max_answer_entries:
            self._forget_answers()

    def _forgotten(self, entry: ProducerEntry) -> None:
        self.answer_entries -= sum(_answer_size(meta) for meta in entry.batches)

    def _forget_answers(self) -> None:
        """Forget the answers of the least recent producers until at most half the
        budget is used (half, so that a full table does not walk on every append)."""
        target = self.max_answer_entries // 2
        for entry in self._producers.values():
            batches = entry.batches
            for i in range(len(batches)):
                meta = batches[i]
                if meta.deduplicated:
                    self.answer_entries -= len(meta.deduplicated)
                    batches[i] = meta._replace(deduplicated=None)
            if self.answer_entries <= target:
                break

    def expire(self, now_ms: int) -> int:
        """Drop producers idle for ``PRODUCER_EXPIRY_MS``; how many were dropped."""
        limit = now_ms - PRODUCER_EXPIRY_MS
        producers = self._producers
        dropped = 0
        while producers:
            producer_id, entry = next(iter(producers.items()))
            if entry.last_append_ms >= limit:
                break
            del producers[producer_id]
            self._forgotten(entry)
            dropped += 1
        if dropped:
            self.version += 1
        return dropped

    # -- rebuilding from stored batches --------------------------------------
    def replay(self, producer_id: int, base_sequence: int, record_count: int, base_offset: int,
               append_time_ms: int) -> None:
        """Apply one stored batch (opening a partition). The log is the truth: a
        stored batch is taken as it is, whatever the table expected. Whether the dedup
        window dropped records from it is not known (the stored copy lacks them).
        A full table evicts the least recent producer however recently it appended: a
        stored batch cannot be refused, and the least recent is the one the live table
        gave up first too (``load`` then drops the expired ones)."""
        meta = BatchMeta(base_sequence, record_count, base_offset, record_count, append_time_ms, None)
        self._remember(producer_id, meta, append_time_ms, evict_idle_before=None)

    def replay_log(self, plog: PartitionLog, from_offset: int) -> int:
        """Replay every stored batch at or after ``from_offset``; batches replayed."""
        replayed = 0
        for header, body in iter_batches(plog, from_offset):
            try:
                producer_id, base_sequence = producer_fields(body)
            except ValueError:
                continue  # not ours to judge here: reads report corrupt batches
            if producer_id:
                self.replay(producer_id, base_sequence, header.record_count, header.base_offset,
                            header.append_time_ms)
                replayed += 1
        return replayed

    # -- snapshots -----------------------------------------------------------
    def snapshot(self, covers_offset: int) -> bytes:
        """The snapshot file's bytes (see module docstring)."""
        parts = [_HEAD.pack(_MAGIC, _VERSION, covers_offset, len(self._producers))]
        for producer_id, entry in self._producers.items():
            parts.append(_PRODUCER.pack(producer_id, entry.last_append_ms, entry.next_sequence, len(entry.batches)))
            for meta in entry.batches:
                parts.append(_BATCH.pack(*meta[:5]))
                answer = meta.deduplicated
                if answer is None:
                    parts.append(_COUNT.pack(_NOT_KNOWN))
                else:
                    parts.append(_COUNT.pack(len(answer)))
                    parts.extend(_ENTRY.pack(index, offset) for index, offset in answer)
        data = b"".join(parts)
        return data + _CRC.pack(zlib.crc32(data))

    @classmethod
    def from_snapshot(cls, raw: bytes, *, max_producers: int = MAX_PRODUCERS,
                      max_answer_entries: int = MAX_ANSWER_ENTRIES) -> tuple[ProducerStateTable, int]:
        """(table, covers_offset); ValueError if ``raw`` is not a valid snapshot (of
        this version or version 1)."""
        if len(raw) < _HEAD.size + _CRC.size:
            raise ValueError("too short")
        (crc,) = _CRC.unpack_from(raw, len(raw) - _CRC.size)
        if zlib.crc32(memoryview(raw)[: len(raw) - _CRC.size]) != crc:
            raise ValueError("checksum mismatch")
        magic, version, covers_offset, count = _HEAD.unpack_from(raw, 0)
        if magic != _MAGIC or version not in _READABLE_VERSIONS:
            raise ValueError(f"not a producer snapshot of version {_READABLE_VERSIONS}")
        table = cls(max_producers=max_producers, max_answer_entries=max_answer_entries)
        pos = _HEAD.size
        end = len(raw) - _CRC.size
        try:
            for _ in range(count):
                producer_id, last_ms, next_sequence, n = _PRODUCER.unpack_from(raw, pos)
                pos += _PRODUCER.size
                entry = table._producers[producer_id] = ProducerEntry()
                entry.last_append_ms, entry.next_sequence = last_ms, next_sequence
                for _ in range(n):
                    base_sequence, sequence_count, base_offset, record_count, append_time_ms = \
                        _BATCH.unpack_from(raw, pos)
                    pos += _BATCH.size
                    answer = None
                    if version >= 2:
                        answer, pos = _read_answer(raw, pos, end)
                    meta = BatchMeta(base_sequence, sequence_count, base_offset, record_count, append_time_ms, answer)
                    entry.batches.append(meta)
                    table.answer_entries += _answer_size(meta)
        except struct.error:
            raise ValueError("truncated") from None
        if pos != end:
            raise ValueError("trailing bytes")
        if table.answer_entries > table.max_answer_entries:
            table._forget_answers()
        return table, covers_offset


class _IdleScan:
    """How far ``ProducerStateTable._idle_at_least`` got: ``idle`` producers from the
    least recent on were idle; ``done`` once a producer was not (or none was left)."""

    __slots__ = ("key", "entries", "idle", "done")

    def __init__(self, key: tuple[int, int, int], entries: Iterator[ProducerEntry]) -> None:
        self.key = key
        self.entries = entries
        self.idle = 0
        self.done = False


def _read_answer(raw: bytes, pos: int, end: int) -> tuple[tuple[tuple[int, int], ...] | None, int]:
    (n,) = _COUNT.unpack_from(raw, pos)
    pos += _COUNT.size
    if n == _NOT_KNOWN:
        return None, pos
    stop = pos + n * _ENTRY.size
    if stop > end:
        raise ValueError("truncated")
    return tuple(_ENTRY.iter_unpack(raw[pos:stop])), stop


def write_snapshot(directory: Path, data: bytes) -> None:
    write_atomic(Path(directory) / SNAPSHOT_FILE, data)


def load(plog: PartitionLog, *, now_ms: int, max_producers: int = MAX_PRODUCERS) -> tuple[ProducerStateTable, int]:
    """The table for an opened log: the snapshot plus the batches stored after it, or
    a rebuild from the whole log when there is no usable snapshot. Returns the table
    and the offset the file on disk covers (-1: none usable). Blocking."""
    path = Path(plog.directory) / SNAPSHOT_FILE
    table, covers = None, -1
    try:
        table, covers = ProducerStateTable.from_snapshot(path.read_bytes(), max_producers=max_producers)
    except FileNotFoundError:
        pass
    except ValueError as exc:
        log.warning("%s: ignoring unreadable %s (%s); rebuilding producer state from the log", plog.name, path, exc)
    if table is not None and covers > plog.log_end_offset:
        log.warning("%s: %s covers offset %d past the log end %d; rebuilding producer state from the log",
                    plog.name, path, covers, plog.log_end_offset)
        table, covers = None, -1
    if table is None:
        table = ProducerStateTable(max_producers=max_producers)
        start = plog.log_start_offset
    else:
        start = covers
    if start < plog.log_end_offset:
        replayed = table.replay_log(plog, start)
        if covers < 0 or replayed:
            log.info("%s: producer state rebuilt from offsets %d..%d (%d idempotent batches)",
                     plog.name, start, plog.log_end_offset, replayed)
    table.expire(now_ms)
    return table, covers
