"""QueueEngine: queue groups on the broker's topics.

Glue between the pure ``window.PartitionQueue`` state, its ``store.QueueStore``
(journal) and the broker (reading records, producing dead letters), which it knows
only through its face, ``consumer_groups.host.Broker``:

- **Admission**: a partition's window is filled from the log (``Broker.read`` from the
  partition's ``scan_offset`` up to the high watermark), batch by batch
  (``admission.admit_batch``: whole runs where no record has a delivery time).
- **Receive** leases up to N records across the group's partitions, starting at a
  rotating partition so no partition starves; with nothing available it waits for new
  records, a due retry or a settlement, up to ``max_wait_ms``. The answer is read from
  the log again: the stored batches holding the leased records (the batched form,
  passed through as stored) or the records decoded from them.
- **Settling** changes memory first, then writes the journal; the answer waits for the
  fsync (acks are never lost once acknowledged). Every change first waits for the
  journal to take writes (``QueueStore.ready``): after a failed write (a full disk)
  changes answer DISK_FULL, changing nothing, until the journal could be rewritten
  from memory, and then go through; no restart needed. Receiving goes on meanwhile
  (deliveries are written lazily).
- **Dead letters** are produced by background tasks (``dead_letters.DeadLetters``) to
  the group's dead-letter topic; the record is settled once that append is durable.
  Nothing else waits for it.
- ``tick()`` (every ``TICK_MS``) expires leases, releases due retries and wakes
  receivers; retention that overtook a partition's window is counted as lost.
- **Damaged records** (a read answers ``CorruptRecords``: a corrupt batch, a
  truncated segment): their offsets are settled as lost, counted
  (``lost_to_corruption`` in stats, a metric) and logged with the range, and the group
  goes on after them, as with retention. They are not dead-lettered: a dead letter
  would carry no record, only the provenance the log line and the counter already
  give. A partition never stalls or spins on them.

Runs on the event loop; no awaits inside a state change.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from segments import CorruptRecords, OffsetOutOfRange, ReadLimits
from streamd.codec import record_runs
from streamd.v1 import streamd_pb2 as pb

from ..coordinator import check_group_name
from ..errors import InvalidGroupRequest, LeaseExpired, QueueGroupExists, QueueGroupNotFound
from ..host import Broker
from .admission import admit_batch
from .dead_letters import DeadLetters, check_dead_letter_topic
from .stats import PartitionStats, partition_stats
from .store import QueueGroup, QueueStore
from .window import DEAD_LETTERING, Lease, PartitionQueue, QueueConfig, check_lease_ms, offset_runs

log = logging.getLogger("streamd.queues")

TICK_MS = 20
MAX_RECEIVE = 10_000
DEFAULT_RECEIVE = 100
READ_BYTES = 1 << 20
MAX_WAIT_MS = 30_000
MAX_RANGE = 100_000  # offsets in one settled range
DEFAULT_RECEIVE_BYTES = (4 << 20) - (64 << 10)  # fits grpc's default 4 MiB receive limit, as Fetch's default
MAX_RECEIVE_BYTES = 32 << 20
#: Bytes of a LeasedRecord around its record, at most (offsets, lease id, times, tags).
LEASED_RECORD_OVERHEAD = 48


class Leased(NamedTuple):
    """One partition's part of a receive: the lease, the stored frames holding its
    records, and (per-record form) the records: offset -> (Record, append_time_ms)."""

    partition: int
    lease: Lease
    frames: bytes = b""
    records: dict | None = None


class SeekStep(NamedTuple):
    """One partition of a seek: its start offset now and after."""

    partition: int
    old_offset: int
    new_offset: int
    clamped: bool  # the target lay outside the log


class QueueEngine:
    def __init__(self, broker: Broker, store: QueueStore, *, rng: random.Random | None = None) -> None:
        self.broker = broker
        self.store = store
        self.rng = rng or random.Random()
        self._changed: dict[tuple[str, str], asyncio.Event] = {}
        self._rotation: dict[tuple[str, str], int] = {}
        self.dead_letters = DeadLetters(broker, store, read_one=self._read_one, on_damaged=self._skip_damaged,
                                        wake=self._wake)
        self._closed = False

    # -- groups ------------------------------------------------------------------
    def group(self, name: str, topic: str) -> QueueGroup:
        self.store.check()  # closed: UNAVAILABLE/STORAGE_FAILED
        check_group_name(name)
        g = self.store.groups.get((name, topic))
        if g is None:
            raise QueueGroupNotFound(name, topic)
        return g

    async def create(self, name: str, topic: str, config: QueueConfig) -> QueueGroup:
        self.broker.check_serving()
        check_group_name(name)
        await self.store.ready()
        t = self.broker.topic(topic)
        if (name, topic) in self.store.groups:
            raise QueueGroupExists(name, topic)
        g = QueueGroup(name, topic, config, self.broker.clock.now_ms())
        check_dead_letter_topic(self.broker, g)
        for p, part in enumerate(t.partitions):
            start = part.high_watermark if config.start == "latest" else part.log_start_offset
            g.partitions[p] = PartitionQueue(p, start, config, rng=self.rng)
        await self.store.create(g)
        log.info("created queue group %s on %s (%s)", name, topic, config)
        return g

    async def delete(self, name: str, topic: str) -> None:
        g = self.group(name, topic)
        await self.store.ready()
        self.dead_letters.forget(name, topic)
        await self.store.delete(g)
        self._wake(g)
        self._changed.pop((name, topic), None)
        self._rotation.pop((name, topic), None)

    async def forget_topic(self, topic: str) -> None:
        """Before a topic is deleted: its queue groups go first (durably)."""
        for g in [g for (_, t), g in self.store.groups.items() if t == topic]:
            await self.delete(g.name, g.topic)

    async def purge_missing_topics(self) -> None:
        """At start-up: queue groups of topics deleted while a crash kept the journal
        from hearing of it."""
        for g in [g for (_, t), g in self.store.groups.items() if t not in self.broker.topics]:
            log.info("deleting queue group %s of topic %s, which no longer exists", g.name, g.topic)
            await self.delete(g.name, g.topic)

    # -- receive -----------------------------------------------------------------
    async def receive(
        self, name: str, topic: str, *, max_records: int, max_wait_ms: int, lease_ms: int | None,
        batched: bool = False, max_bytes: int = 0,
    ) -> list[Leased]:
        """Lease up to ``max_records`` (and about ``max_bytes``), one ``Leased`` per
        partition that had some."""
        self.broker.check_serving()
        g = self.group(name, topic)
        if g.config.at_most_once:  # handing out is settling: not while the journal cannot take it
            await self.store.ready()
        n = _receive_count(max_records)
        try:
            lease = check_lease_ms(lease_ms) if lease_ms is not None else g.config.lease_ms
        except ValueError as exc:
            raise InvalidGroupRequest("lease_ms", str(exc)) from None
        if not 0 <= max_wait_ms:
            raise InvalidGroupRequest("max_wait_ms", "must not be negative")
        if not 0 <= max_bytes <= MAX_RECEIVE_BYTES:
            raise InvalidGroupRequest("max_bytes", f"must be 0 .. {MAX_RECEIVE_BYTES}")
        budget = max_bytes or DEFAULT_RECEIVE_BYTES
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max_wait_ms, MAX_WAIT_MS) / 1000
        while True:
            out, writes = self._lease_round(g, n, lease, batched, budget)
            if writes:
                await asyncio.gather(*writes)
            remaining = deadline - loop.time()
            if out or remaining <= 0:
                return out
            await self._wait(g, remaining)
            if self.broker.state != "serving":
                return []  # stopping: a long poll in flight answers now, empty
            if self.store.groups.get((name, topic)) is not g:
                raise QueueGroupNotFound(name, topic)

    def _lease_round(self, g: QueueGroup, n: int, lease_ms: int, batched: bool,
                     budget: int) -> tuple[list[Leased], list]:
        """Leased records, and the journal writes to await before handing them out."""
        now = self.broker.clock.now_ms()
        key = (g.name, g.topic)
        count = len(g.partitions)
        first = self._rotation.get(key, 0)
        self._rotation[key] = (first + 1) % max(count, 1)
        out: list[Leased] = []
        writes: list = []
        taken = 0
        for i in range(count):
            p = (first + i) % count
            q = g.partitions[p]
            try:
                self._fill(g, q)
                self._expire(g, q, now)
                if taken >= n or budget <= 0:
                    continue
                found = q.pick(n - taken)
                if not len(found):
                    continue
                # What fits in the answer is read before anything is leased: records
                # left out stay available, untouched.
                frames, keep = self._frames(g.topic, p, found, budget, first=not out)
                records, size = None, len(frames)
                if not batched:
                    # The answer holds the records, not the frames (which lz4 may have
                    # made far smaller): the budget goes by the records.
                    records, keep, size = _decoded(frames, found[:keep], budget, first=not out)
                lease = q.take(found[:keep], now, lease_ms)
                if lease is None:
                    continue
                self.store.delivered(g, p, lease, now)
                if g.config.at_most_once:  # handed out = acked: durable before the answer goes
                    writes.append(self.store.settled(g, p, lease.offsets))
                taken += len(lease)
                budget -= size
                out.append(Leased(p, lease, frames=frames, records=records))
            except OffsetOutOfRange:
                # Retention deleted records under us (it runs off the loop): count them
                # as lost and go on with the other partitions.
                self._skip_retained(g, q)
            except CorruptRecords as exc:  # records of the window became unreadable
                self._skip_damaged(g, q, exc)
        self.dead_letters.start(g)
        return out, writes

    def _frames(self, topic: str, partition: int, offsets: np.ndarray, budget: int, *,
                first: bool) -> tuple[bytes, int]:
        """The stored frames holding ``offsets`` (ascending), each once, as stored, up
        to ``budget`` bytes (at least one frame when ``first``), and how many of the
        offsets they hold."""
        frames: list[bytes] = []
        seen: set[int] = set()
        size = 0
        for lo, hi in offset_runs(offsets):
            position = lo
            while position <= hi:
                out = self.broker.read(topic, partition, position, ReadLimits(hi - position + 1, READ_BYTES))
                data = out.data
                if not data:
                    raise OffsetOutOfRange(position, 0, 0, name=f"{topic}/{partition}")
                for h in out.frames():
                    if h.base_offset in seen:
                        position = max(position, h.next_offset)
                        continue
                    if size + h.size > budget and (frames or not first):
                        return b"".join(frames), int(np.searchsorted(offsets, max(position, h.base_offset)))
                    seen.add(h.base_offset)
                    frames.append(data[h.position:h.end])
                    size += h.size
                    position = max(position, h.next_offset)
        return b"".join(frames), len(offsets)

    async def _wait(self, g: QueueGroup, timeout_s: float) -> None:
        """Until new records, a due timer or a settlement may make records available."""
        event = self._changed.setdefault((g.name, g.topic), asyncio.Event())
        event.clear()
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(event.wait()), asyncio.ensure_future(asyncio.shield(self.broker.stopping()))
        ]
        t = self.broker.topics.get(g.topic)
        if t is not None:
            for p, q in g.partitions.items():
                if q.room() > 0 and p < len(t.partitions):
                    waits.append(asyncio.ensure_future(t.partitions[p].wait_for_data(q.scan_offset, timeout_s)))
        timers = [q.next_timer_ms() for q in g.partitions.values()]
        due = min((x for x in timers if x is not None), default=None)
        if due is not None:
            timeout_s = min(timeout_s, max(0.0, (due - self.broker.clock.now_ms()) / 1000))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _wake(self, g: QueueGroup) -> None:
        event = self._changed.get((g.name, g.topic))
        if event is not None:
            event.set()

    # -- admission -----------------------------------------------------------------
    def _fill(self, g: QueueGroup, q: PartitionQueue) -> None:
        part = self.broker.partition(g.topic, q.partition)
        self._skip_retained(g, q)
        end = part.high_watermark
        while q.scan_offset < end and q.room() > 0:
            try:
                out = self.broker.read(g.topic, q.partition, q.scan_offset, ReadLimits(q.room(), READ_BYTES))
            except CorruptRecords as exc:
                if not self._skip_damaged(g, q, exc):
                    return  # the window must drain before it can span the damage
                continue
            if not out.data:
                return
            for batch in pb.FetchResponse.FromString(out.data).batches:
                if not admit_batch(q, batch, end):
                    return

    def _skip_retained(self, g: QueueGroup, q: PartitionQueue) -> None:
        """Records retention deleted before this group settled them: counted, logged."""
        t = self.broker.topics.get(g.topic)
        if t is None or q.partition >= len(t.partitions):
            return
        log_start = t.partitions[q.partition].log_start_offset
        if q.scan_offset < log_start or q.start_offset < log_start:
            before = q.stats.lost_to_retention
            q.skip_to(log_start)
            lost = q.stats.lost_to_retention - before
            self.store.skipped(g, q.partition, q.start_offset, lost)
            if lost:
                log.warning("queue group %s: retention deleted %d undelivered record(s) of %s/%d",
                            g.name, lost, g.topic, q.partition)

    def _skip_damaged(self, g: QueueGroup, q: PartitionQueue, exc: CorruptRecords) -> bool:
        """Settle the records of a damaged range as lost (counted, journaled, logged);
        whether ``scan_offset`` moved past it."""
        before = q.stats.lost_to_corruption
        done = q.skip_damaged(exc.first_offset, exc.last_offset)
        lost = q.stats.lost_to_corruption - before
        if done:
            self.store.damaged(g, q.partition, done, lost)
        if lost:
            log.warning("queue group %s: offsets %d..%d of %s/%d cannot be read (%s); %d record(s) not yet "
                        "settled are lost to the group and skipped", g.name, exc.first_offset, exc.last_offset,
                        g.topic, q.partition, exc.cause, lost,
                        extra={"event": "queue_records_damaged", "group": g.name, "topic": g.topic,
                               "partition": q.partition, "first_offset": exc.first_offset,
                               "last_offset": exc.last_offset, "lost": lost})
        self._wake(g)
        return q.scan_offset > exc.last_offset

    def groups(self, topic: str = "") -> list[QueueGroup]:
        """The queue groups (of ``topic``, if given), by topic then name."""
        groups = sorted(self.store.groups.values(), key=lambda g: (g.topic, g.name))
        return [g for g in groups if not topic or g.topic == topic]

    def partition_stats(self, g: QueueGroup, now: int) -> list[PartitionStats]:
        """Per partition of ``g``: backlog, in flight, settled counts, oldest unacked age."""
        topic = self.broker.topics.get(g.topic)
        out = []
        for p, q in sorted(g.partitions.items()):
            end = topic.partitions[p].high_watermark if topic is not None and p < len(topic.partitions) else 0
            out.append(partition_stats(q, end, now, self.oldest_append_ms(g, q)))
        return out

    def oldest_append_ms(self, g: QueueGroup, q: PartitionQueue) -> int | None:
        """Append time of the oldest unsettled record, from the window or, when the
        window has not reached it yet (nobody received lately), from the log."""
        oldest = q.oldest_unsettled_append_ms()
        if oldest is not None:
            return oldest
        t = self.broker.topics.get(g.topic)
        if t is None or q.partition >= len(t.partitions) or q.start_offset >= t.partitions[q.partition].high_watermark:
            return None
        try:
            return self._read_one(g.topic, q.partition, max(q.start_offset, q.scan_offset))[1]
        except Exception:  # a stat is not worth failing a describe
            return None

    def _read_one(self, topic: str, partition: int, offset: int) -> tuple[pb.Record, int]:
        out = self.broker.read(topic, partition, offset, ReadLimits(1, 1))
        for _, _, append_time, records in record_runs(pb.FetchResponse.FromString(out.data).batches,
                                                      ((offset, offset, None),)):
            return records[0], append_time
        raise OffsetOutOfRange(offset, out.log_start_offset, out.log_end_offset, name=f"{topic}/{partition}")

    # -- settling ---------------------------------------------------------------------
    async def settle(
        self, name: str, topic: str, settlements: Iterable[tuple], ranges: Iterable[tuple] = ()
    ) -> list[BaseException | int | tuple | None]:
        """Apply (action, partition, offset, lease_id, delay_ms, reason) settlements,
        then (action, partition, first, last, lease_id, delay_ms, reason) ranges, in
        order. One result each: for a settlement None, the new lease expiry (extend) or
        the error; for a range (settled, refused, new expiry or None, the error for
        the refused offsets or None), or the error of a bad range.
        Returns once every change is durable."""
        self.broker.check_serving()
        g = self.group(name, topic)
        await self.store.ready()
        now = self.broker.clock.now_ms()
        results: list = []
        acked: dict[int, list] = {}
        retried: dict[int, list] = {}
        dead: dict[int, list] = {}
        changes = (acked, retried, dead)
        for action, p, offset, lease_id, delay_ms, reason in settlements:
            q = g.partitions.get(p)
            try:
                if q is None:
                    raise LeaseExpired(p, offset, "no such partition")
                results.append(self._settle_one(g, q, action, offset, lease_id, delay_ms, reason, now, changes))
            except (LeaseExpired, ValueError) as exc:
                results.append(exc if isinstance(exc, LeaseExpired) else InvalidGroupRequest("settlement", str(exc)))
        for action, p, first, last, lease_id, delay_ms, reason in ranges:
            q = g.partitions.get(p)
            try:
                if q is None:
                    raise LeaseExpired(p, first, "no such partition")
                results.append(self._settle_range(g, q, action, first, last, lease_id, delay_ms, reason, now,
                                                  changes))
            except ValueError as exc:
                results.append(InvalidGroupRequest("range", str(exc)))
            except LeaseExpired as exc:
                results.append(exc)
        writes = [self.store.settled(g, p, np.sort(np.concatenate(parts))) for p, parts in acked.items()]
        writes += [self.store.retried(g, p, entries, durable=True) for p, entries in retried.items()]
        writes += [self.store.dead(g, p, entries) for p, entries in dead.items()]
        if retried or acked:
            self._wake(g)
        self.dead_letters.start(g)
        await asyncio.gather(*writes)
        return results

    def _settle_one(self, g, q, action, offset, lease_id, delay_ms, reason, now, changes):
        acked, retried, dead = changes
        if action == "ack":
            q.ack(offset, lease_id, now)
            acked.setdefault(q.partition, []).append(np.array([offset], np.int64))
            return None
        if action == "extend":
            return q.extend(offset, lease_id, now, delay_ms if delay_ms is not None else g.config.lease_ms)
        if action == "nack":
            e = q.nack(offset, lease_id, now, delay_ms=_nack_delay(delay_ms), reason=reason)
        elif action == "reject":
            e = q.reject(offset, lease_id, now, reason=reason)
        else:
            raise ValueError(f"unknown settlement {action!r}")
        (dead if e.state == DEAD_LETTERING else retried).setdefault(q.partition, []).append(e)
        return None

    def _settle_range(self, g, q, action, first, last, lease_id, delay_ms, reason, now, changes):
        """(settled, refused, new expiry or None, error or None) for the range
        ``first .. last``: the offsets the lease holds take effect, the others are
        left as they are."""
        if not 0 <= first <= last or last - first >= MAX_RANGE:
            raise ValueError(f"a range is first_offset <= last_offset, at most {MAX_RANGE} offsets")
        acked, retried, dead = changes
        expires = None
        if action == "ack":
            held = q.ack_range(first, last, lease_id, now)
            if len(held):
                acked.setdefault(q.partition, []).append(held)
        elif action == "extend":
            held, expires = q.extend_range(first, last, lease_id, now,
                                           delay_ms if delay_ms is not None else g.config.lease_ms)
        elif action in ("nack", "reject"):
            delay = _nack_delay(delay_ms) if action == "nack" else None
            held = q.held(first, last, lease_id, now)
            for offset in held.tolist():
                if action == "nack":
                    e = q.nack(offset, lease_id, now, delay_ms=delay, reason=reason)
                else:
                    e = q.reject(offset, lease_id, now, reason=reason)
                (dead if e.state == DEAD_LETTERING else retried).setdefault(q.partition, []).append(e)
        else:
            raise ValueError(f"unknown settlement {action!r}")
        refused = last - first + 1 - len(held)
        error = None
        if refused:
            error = LeaseExpired(q.partition, first, f"{refused} of the offsets {first}..{last} not held by this "
                                                     "lease (expired, settled or another's)")
        return len(held), refused, expires, error

    # -- timers ------------------------------------------------------------------------
    async def tick(self) -> None:
        if self._closed:
            return
        now = self.broker.clock.now_ms()
        for g in list(self.store.groups.values()):
            woke = False
            for q in g.partitions.values():
                self._skip_retained(g, q)  # so stats report losses even with nobody receiving
                due = q.next_timer_ms()
                if due is not None and due <= now:
                    self._expire(g, q, now)
                    woke = True
            self.dead_letters.start(g)  # new ones, and failed attempts to try again
            if woke:
                self._wake(g)

    def _expire(self, g: QueueGroup, q: PartitionQueue, now: int) -> None:
        expired = q.expire(now)
        if expired:
            retry = [e for e in expired if e.state != DEAD_LETTERING]
            dead = [e for e in expired if e.state == DEAD_LETTERING]
            if retry:
                self.store.retried(g, q.partition, retry, durable=False)
            if dead:
                self.store.dead(g, q.partition, dead)

    # -- seek -------------------------------------------------------------------------------
    def plan_seek(self, g: QueueGroup, partitions: Sequence[int], target: str, value: int = 0) -> list[SeekStep]:
        """Where a seek of ``partitions`` to ``target`` ("offset" or "timestamp_ms" ``value``,
        "earliest", "latest") moves each start offset, clamped to the log."""
        plan = []
        for p in partitions:
            part = self.broker.partition(g.topic, p)
            start, end = part.log_start_offset, part.high_watermark
            if target == "offset":
                wanted = value
            elif target == "timestamp_ms":
                wanted = self.broker.offset_for(g.topic, p, timestamp_ms=value)
            elif target == "latest":
                wanted = end
            else:
                wanted = start
            new = min(max(wanted, start), end)
            plan.append(SeekStep(p, g.partitions[p].start_offset, new, new != wanted))
        return plan

    async def seek(self, name: str, topic: str, targets: dict[int, int]) -> None:
        g = self.group(name, topic)
        await self.store.ready()
        writes = []
        for p, offset in targets.items():
            g.partitions[p].seek(offset)
            writes.append(self.store.sought(g, p, offset))
        self._wake(g)
        await asyncio.gather(*writes)

    async def close(self) -> None:
        self._closed = True
        await self.dead_letters.close()
        await self.store.close()


def _decoded(frames: bytes, offsets: np.ndarray, budget: int, *, first: bool) -> tuple[dict, int, int]:
    """The records at ``offsets`` decoded from ``frames`` (offset -> (Record,
    append_time_ms)), up to ``budget`` bytes of records (at least one when
    ``first``), how many of the offsets that is and the bytes they take."""
    found: dict[int, tuple[pb.Record, int]] = {}
    runs = ((first, last, None) for first, last in offset_runs(offsets))
    for _, run_first, append_time, records in record_runs(pb.FetchResponse.FromString(frames).batches, runs):
        for i, r in enumerate(records, run_first):
            found[i] = (r, append_time)
    out: dict[int, tuple[pb.Record, int]] = {}
    size = 0
    for offset in offsets.tolist():
        record = found[offset]
        grown = size + record[0].ByteSize() + LEASED_RECORD_OVERHEAD
        if grown > budget and (out or not first):
            break
        out[offset] = record
        size = grown
    return out, len(out), size


def _nack_delay(delay_ms: int | None) -> int | None:
    if delay_ms is not None and not 0 <= delay_ms <= 7 * 24 * 3600 * 1000:
        raise ValueError("delay_ms must be 0 .. 7 days")
    return delay_ms


def _receive_count(max_records: int) -> int:
    if max_records < 0:
        raise InvalidGroupRequest("max_records", "must not be negative")
    if max_records > MAX_RECEIVE:
        raise InvalidGroupRequest("max_records", f"at most {MAX_RECEIVE}")
    return max_records or DEFAULT_RECEIVE
