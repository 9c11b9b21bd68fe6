"""QueueEngine: queue groups on the broker's topics.

Glue between the pure ``consumer_groups.queue.PartitionQueue`` state, its
``QueueStore`` (journal) and the ``Broker`` (reading records, producing dead letters):

- **Admission**: a partition's window is filled from the log (``Broker.read`` from the
  partition's ``scan_offset`` up to the high watermark), decoding each batch once to
  learn the records' keys and delivery times. Decoded records are kept for delivery
  while the window holds them (up to ``CACHE_BYTES`` per partition; beyond that a
  record is read again when delivered).
- **Receive** leases up to N records across the group's partitions, starting at a
  rotating partition so no partition starves; with nothing available it waits for new
  records, a due retry or a settlement, up to ``max_wait_ms``.
- **Settling** changes memory first, then writes the journal; the answer waits for the
  fsync (acks are never lost once acknowledged).
- **Dead letters** are produced by a background task to the group's dead-letter topic
  (created on demand with the source's partition count) with provenance headers; the
  record is settled once that append is durable. Nothing else waits for it.
- ``tick()`` (every ``TICK_MS``) expires leases, releases due retries and wakes
  receivers; retention that overtook a partition's window is counted as lost.

Runs on the event loop; no awaits inside a state change.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable

from consumer_groups.coordinator import check_group_name
from consumer_groups.errors import LeaseExpired, QueueGroupExists, QueueGroupNotFound
from consumer_groups.queue import DEAD_LETTERING, PartitionQueue, QueueConfig, check_lease_ms
from consumer_groups.queue_store import QueueGroup, QueueStore
from segments import OffsetOutOfRange
from streamd.client.records import batch_records
from streamd.v1 import streamd_pb2 as pb

from .broker import Broker
from .errors import InvalidArgument, TopicAlreadyExists, TopicNotFound
from .topic import check_topic_name

log = logging.getLogger("streamd.queues")

TICK_MS = 20
MAX_RECEIVE = 10_000
DEFAULT_RECEIVE = 100
CACHE_BYTES = 64 << 20
READ_BYTES = 1 << 20
MAX_WAIT_MS = 30_000
DLQ_HEADROOM = 64 * 1024
MAX_RECORD_LIMIT = 8 * 1024 * 1024
DLQ_HEADERS = ("topic", "partition", "offset", "group", "deliveries", "reason", "first-delivery-ms",
               "last-delivery-ms")


class _Cache:
    """Decoded records of one partition's window: offset -> (Record, append_time_ms, size)."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[pb.Record, int, int]] = {}
        self.bytes = 0

    def put(self, offset: int, record: pb.Record, append_time_ms: int, size: int) -> None:
        if self.bytes + size <= CACHE_BYTES:
            self.records[offset] = (record, append_time_ms, size)
            self.bytes += size

    def take(self, offset: int) -> tuple[pb.Record, int] | None:
        item = self.records.get(offset)
        return item[:2] if item is not None else None

    def drop(self, offset: int) -> None:
        item = self.records.pop(offset, None)
        if item is not None:
            self.bytes -= item[2]

    def clear(self) -> None:
        self.records.clear()
        self.bytes = 0


class QueueEngine:
    def __init__(self, broker: Broker, store: QueueStore, *, rng: random.Random | None = None) -> None:
        self.broker = broker
        self.store = store
        self.rng = rng or random.Random()
        self._caches: dict[tuple[str, str, int], _Cache] = {}
        self._changed: dict[tuple[str, str], asyncio.Event] = {}
        self._rotation: dict[tuple[str, str], int] = {}
        self._dead_letter_tasks: set[asyncio.Task] = set()
        self._dead_letter_backoff: dict[tuple[str, str, int, int], float] = {}
        self._closed = False

    # -- groups ------------------------------------------------------------------
    def group(self, name: str, topic: str) -> QueueGroup:
        self.store.check()  # a failed journal: UNAVAILABLE/STORAGE_FAILED, not silent drift
        check_group_name(name)
        g = self.store.groups.get((name, topic))
        if g is None:
            raise QueueGroupNotFound(name, topic)
        return g

    async def create(self, name: str, topic: str, config: QueueConfig) -> QueueGroup:
        self.broker.check_serving()
        check_group_name(name)
        t = self.broker.topic(topic)
        if (name, topic) in self.store.groups:
            raise QueueGroupExists(name, topic)
        g = QueueGroup(name, topic, config, self.broker.clock.now_ms())
        check_topic_name(g.dead_letter_topic)
        if g.dead_letter_topic == topic:
            raise InvalidArgument("config.dead_letter_topic", "must not be the group's own topic")
        for p, part in enumerate(t.partitions):
            start = part.high_watermark if config.start == "latest" else part.log.log_start_offset
            g.partitions[p] = PartitionQueue(p, start, config, rng=self.rng)
        await self.store.create(g)
        log.info("created queue group %s on %s (%s)", name, topic, config)
        return g

    async def delete(self, name: str, topic: str) -> None:
        g = self.group(name, topic)
        for p in g.partitions:
            self._caches.pop((name, topic, p), None)
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
        self, name: str, topic: str, *, max_records: int, max_wait_ms: int, lease_ms: int | None
    ) -> list[tuple[int, object, pb.Record, int]]:
        """Lease up to ``max_records``: a list of (partition, Entry, Record, append_time_ms)."""
        self.broker.check_serving()
        g = self.group(name, topic)
        n = _receive_count(max_records)
        try:
            lease = check_lease_ms(lease_ms) if lease_ms is not None else g.config.lease_ms
        except ValueError as exc:
            raise InvalidArgument("lease_ms", str(exc)) from None
        if not 0 <= max_wait_ms:
            raise InvalidArgument("max_wait_ms", "must not be negative")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max_wait_ms, MAX_WAIT_MS) / 1000
        while True:
            out, writes = self._lease_round(g, n, lease)
            if writes:
                await asyncio.gather(*writes)
            remaining = deadline - loop.time()
            if out or remaining <= 0:
                return out
            await self._wait(g, remaining)
            self.broker.check_serving()
            if self.store.groups.get((name, topic)) is not g:
                raise QueueGroupNotFound(name, topic)

    def _lease_round(self, g: QueueGroup, n: int, lease_ms: int) -> tuple[list, list]:
        """Leased records, and the journal writes to await before handing them out."""
        now = self.broker.clock.now_ms()
        key = (g.name, g.topic)
        count = len(g.partitions)
        first = self._rotation.get(key, 0)
        self._rotation[key] = (first + 1) % max(count, 1)
        out: list = []
        writes: list = []
        for i in range(count):
            p = (first + i) % count
            q = g.partitions[p]
            try:
                self._fill(g, q)
                self._expire(g, q, now)
                if len(out) < n:
                    self._lease_partition(g, q, n - len(out), lease_ms, now, out, writes)
            except OffsetOutOfRange:
                # Retention deleted records under us (it runs off the loop): count them
                # as lost and go on with the other partitions.
                self._skip_retained(g, q)
        self._start_dead_letters(g)
        return out, writes

    def _lease_partition(self, g: QueueGroup, q: PartitionQueue, n: int, lease_ms: int, now: int, out, writes):
        entries = q.lease(n, now, lease_ms)
        if not entries:
            return
        self.store.delivered(g, q.partition, entries)
        cache = self._cache(g, q.partition)
        for e in entries:
            record = cache.take(e.offset) or self._read_one(g.topic, q.partition, e.offset)
            if g.config.at_most_once:
                cache.drop(e.offset)
            out.append((q.partition, e, *record))
        if g.config.at_most_once:  # handed out = acked: durable before the answer goes
            writes.append(self.store.settled(g, q.partition, [e.offset for e in entries]))

    async def _wait(self, g: QueueGroup, timeout_s: float) -> None:
        """Until new records, a due timer or a settlement may make records available."""
        event = self._changed.setdefault((g.name, g.topic), asyncio.Event())
        event.clear()
        waits = [asyncio.ensure_future(event.wait())]
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
        cache = self._cache(g, q.partition)
        unsettled, span = q.rooms()  # counted down here rather than recomputed per record
        room = min(unsettled, span)
        while room > 0 and q.scan_offset < end:
            out = self.broker.read(g.topic, q.partition, q.scan_offset, max_records=room, max_bytes=READ_BYTES)
            if not out.data:
                return
            admit, put = q.admit, cache.put
            for batch in pb.FetchResponse.FromString(out.data).batches:
                base, append_time = batch.base_offset, batch.append_time_ms
                # One size estimate per batch (a ByteSize call per record cost ~8% here).
                size = len(batch.records) // max(1, batch.record_count) + 16
                for i, r in enumerate(batch_records(batch).records):
                    offset = base + i
                    if offset < q.scan_offset:
                        continue
                    if offset >= end or unsettled <= 0 or span <= 0:
                        return
                    delay = r.delay_ms
                    at = r.deliver_at_ms
                    if delay:
                        at = max(at, append_time + delay)
                    blocked = q.blocked
                    admit(offset, key=r.key if r.HasField("key") else None, deliver_at_ms=at,
                          append_time_ms=append_time)
                    span -= 1
                    if q.blocked == blocked:  # a blocked record waits behind its key, not in flight
                        unsettled -= 1
                    put(offset, r, append_time, size)
            unsettled, span = q.rooms()
            room = min(unsettled, span)

    def _skip_retained(self, g: QueueGroup, q: PartitionQueue) -> None:
        """Records retention deleted before this group settled them: counted, logged."""
        t = self.broker.topics.get(g.topic)
        if t is None or q.partition >= len(t.partitions):
            return
        log_start = t.partitions[q.partition].log.log_start_offset
        if q.scan_offset < log_start or q.start_offset < log_start:
            before = q.stats.lost_to_retention
            q.skip_to(log_start)
            self._cache(g, q.partition).clear()
            lost = q.stats.lost_to_retention - before
            self.store.skipped(g, q.partition, q.start_offset, lost)
            if lost:
                log.warning("queue group %s: retention deleted %d undelivered record(s) of %s/%d",
                            g.name, lost, g.topic, q.partition)

    def oldest_append_ms(self, g: QueueGroup, q: PartitionQueue) -> int | None:
        """Append time of the oldest unsettled record, from the window or, when the
        window has not reached it yet (nobody received lately), from the log."""
        oldest = q.oldest_unsettled()
        if oldest is not None:
            return oldest.append_time_ms
        t = self.broker.topics.get(g.topic)
        if t is None or q.partition >= len(t.partitions) or q.start_offset >= t.partitions[q.partition].high_watermark:
            return None
        try:
            return self._read_one(g.topic, q.partition, max(q.start_offset, q.scan_offset))[1]
        except Exception:  # a stat is not worth failing a describe
            return None

    def _read_one(self, topic: str, partition: int, offset: int) -> tuple[pb.Record, int]:
        out = self.broker.read(topic, partition, offset, max_records=1, max_bytes=1)
        for batch in pb.FetchResponse.FromString(out.data).batches:
            i = offset - batch.base_offset
            records = batch_records(batch).records
            if 0 <= i < len(records):
                return records[i], batch.append_time_ms
        raise OffsetOutOfRange(offset, out.log_start_offset, out.log_end_offset, name=f"{topic}/{partition}")

    def _cache(self, g: QueueGroup, p: int) -> _Cache:
        key = (g.name, g.topic, p)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = _Cache()
        return cache

    # -- settling ---------------------------------------------------------------------
    async def settle(self, name: str, topic: str, settlements: Iterable[tuple]) -> list[BaseException | int | None]:
        """Apply (action, partition, offset, lease_id, delay_ms, reason) settlements in
        order; one result each: None, the new lease expiry (extend) or the error.
        Returns once every change is durable."""
        self.broker.check_serving()
        g = self.group(name, topic)
        now = self.broker.clock.now_ms()
        results: list = []
        acked: dict[int, list[int]] = {}
        retried: dict[int, list] = {}
        dead: dict[int, list] = {}
        for action, p, offset, lease_id, delay_ms, reason in settlements:
            q = g.partitions.get(p)
            try:
                if q is None:
                    raise LeaseExpired(p, offset, "no such partition")
                results.append(self._settle_one(g, q, action, offset, lease_id, delay_ms, reason, now,
                                                acked, retried, dead))
            except (LeaseExpired, ValueError) as exc:
                results.append(exc if isinstance(exc, LeaseExpired) else InvalidArgument("settlement", str(exc)))
        writes = [self.store.settled(g, p, offsets) for p, offsets in acked.items()]
        writes += [self.store.retried(g, p, entries, durable=True) for p, entries in retried.items()]
        writes += [self.store.dead(g, p, entries) for p, entries in dead.items()]
        if retried or acked:
            self._wake(g)
        self._start_dead_letters(g)
        await asyncio.gather(*writes)
        return results

    def _settle_one(self, g, q, action, offset, lease_id, delay_ms, reason, now, acked, retried, dead):
        if action == "ack":
            q.ack(offset, lease_id, now)
            self._cache(g, q.partition).drop(offset)
            acked.setdefault(q.partition, []).append(offset)
            return None
        if action == "extend":
            return q.extend(offset, lease_id, now, delay_ms if delay_ms is not None else g.config.lease_ms)
        if action == "nack":
            if delay_ms is not None and not 0 <= delay_ms <= 7 * 24 * 3600 * 1000:
                raise ValueError("delay_ms must be 0 .. 7 days")
            e = q.nack(offset, lease_id, now, delay_ms=delay_ms, reason=reason)
        elif action == "reject":
            e = q.reject(offset, lease_id, now, reason=reason)
        else:
            raise ValueError(f"unknown settlement {action!r}")
        (dead if e.state == DEAD_LETTERING else retried).setdefault(q.partition, []).append(e)
        return None

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
            self._start_dead_letters(g)  # new ones, and failed attempts to try again
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

    # -- dead letters --------------------------------------------------------------------
    def _start_dead_letters(self, g: QueueGroup) -> None:
        if self._closed:
            return
        for p, q in g.partitions.items():
            while q.to_dead_letter:
                offset = q.to_dead_letter.popleft()
                task = asyncio.ensure_future(self._dead_letter(g, q, offset))
                self._dead_letter_tasks.add(task)
                task.add_done_callback(self._dead_letter_tasks.discard)

    async def _dead_letter(self, g: QueueGroup, q: PartitionQueue, offset: int) -> None:
        e = q.entries.get(offset)
        if e is None or e.state != DEAD_LETTERING or not self._live(g):
            return
        key = (g.name, g.topic, q.partition, offset)
        try:
            record, _ = self._cache(g, q.partition).take(offset) or self._read_one(g.topic, q.partition, offset)
            letter = pb.Record()
            letter.CopyFrom(record)
            for field in ("deliver_at_ms", "delay_ms", "idempotency_key"):
                letter.ClearField(field)
            values = (g.topic, q.partition, offset, g.name, e.deliveries, e.reason, e.first_delivery_ms,
                      e.last_delivery_ms)
            for name, value in zip(DLQ_HEADERS, values):
                letter.headers.add(key=f"streamd-dlq-{name}", value=str(value).encode())
            target = self._dead_letter_topic(g)
            _, durable = self.broker.append(target, [], [letter.SerializeToString()])
            await durable
        except Exception as exc:
            delay = min(60.0, self._dead_letter_backoff.get(key, 0.5) * 2)
            self._dead_letter_backoff[key] = delay
            log.error("dead-lettering %s/%d offset %d for group %s failed (%s); retrying in %.0f s",
                      g.topic, q.partition, offset, g.name, exc, delay)
            await asyncio.sleep(delay)
            if q.entries.get(offset) is e and self._live(g):
                q.to_dead_letter.append(offset)
            return
        self._dead_letter_backoff.pop(key, None)
        if q.entries.get(offset) is e and self._live(g):
            q.dead_lettered(offset)
            self._cache(g, q.partition).drop(offset)
            self._wake(g)  # a full window may have room again
            await self.store.settled(g, q.partition, [offset], kind="d")

    def _live(self, g: QueueGroup) -> bool:
        return self.store.groups.get((g.name, g.topic)) is g

    def _dead_letter_topic(self, g: QueueGroup) -> str:
        name = g.dead_letter_topic
        try:
            self.broker.topic(name)
        except TopicNotFound:
            source = self.broker.topic(g.topic).meta.settings
            # Room for the streamd-dlq-* headers on top of the largest source record.
            overrides = {"max_record_bytes": min(source.max_record_bytes + DLQ_HEADROOM, MAX_RECORD_LIMIT)}
            try:
                self.broker.create_topic(name, len(g.partitions), overrides)
                log.info("created dead-letter topic %s for queue group %s", name, g.name)
            except TopicAlreadyExists:
                pass
        return name

    # -- seek -------------------------------------------------------------------------------
    async def seek(self, name: str, topic: str, targets: dict[int, int]) -> None:
        g = self.group(name, topic)
        writes = []
        for p, offset in targets.items():
            g.partitions[p].seek(offset)
            self._cache(g, p).clear()
            writes.append(self.store.sought(g, p, offset))
        self._wake(g)
        await asyncio.gather(*writes)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._dead_letter_tasks):
            task.cancel()
        await asyncio.gather(*self._dead_letter_tasks, return_exceptions=True)
        await self.store.close()


def _receive_count(max_records: int) -> int:
    if max_records < 0:
        raise InvalidArgument("max_records", "must not be negative")
    if max_records > MAX_RECEIVE:
        raise InvalidArgument("max_records", f"at most {MAX_RECEIVE}")
    return max_records or DEFAULT_RECEIVE
