"""Dead letters: records that used up their deliveries (or were rejected) are
produced to the group's dead-letter topic, then settled.

A background task per record appends a copy of it to the dead-letter topic (created on
demand with the source's partition count, and room for the headers on top of the
source's largest record) with provenance headers ``streamd-dlq-<name>`` (topic,
partition, offset, group, deliveries, reason, first and last delivery time); the
record is settled in the window and the journal once that append is as durable as the
target topic promises, so a dead letter is never lost and never settled unwritten.
Nothing else waits for it. A failed append (a full disk) is retried with a doubling
backoff (0.5 s to 60 s) and said once per group until it works again. A record whose
stored batch is damaged is settled as lost (``on_damaged``), not retried forever.

Every task re-checks, after its awaits, that the group and the record's entry are
still the ones it started with (a delete, seek or redelivery in between wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from segments import CorruptRecords
from streamd.v1 import streamd_pb2 as pb

from ..errors import InvalidGroupRequest
from ..host import Broker
from .store import QueueGroup, QueueStore
from .window import DEAD_LETTERING, PartitionQueue

log = logging.getLogger("streamd.queues")

DLQ_HEADROOM = 64 * 1024
MAX_RECORD_LIMIT = 8 * 1024 * 1024
DLQ_HEADERS = ("topic", "partition", "offset", "group", "deliveries", "reason", "first-delivery-ms",
               "last-delivery-ms")


class DeadLetters:
    """The dead-letter tasks of every queue group of one engine."""

    def __init__(
        self,
        broker: Broker,
        store: QueueStore,
        *,
        read_one: Callable[[str, int, int], tuple[pb.Record, int]],
        on_damaged: Callable[[QueueGroup, PartitionQueue, CorruptRecords], object],
        wake: Callable[[QueueGroup], None],
    ) -> None:
        self.broker = broker
        self.store = store
        self._read_one = read_one
        self._on_damaged = on_damaged
        self._wake = wake
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff: dict[tuple[str, str, int, int], float] = {}
        #: (group, topic) -> dead-letter attempts failed since the last that worked.
        self._failing: dict[tuple[str, str], int] = {}
        self._closed = False

    def forget(self, name: str, topic: str) -> None:
        """A deleted group's backoffs and failure count."""
        for key in [k for k in self._backoff if k[:2] == (name, topic)]:
            del self._backoff[key]
        self._failing.pop((name, topic), None)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def start(self, g: QueueGroup) -> None:
        if self._closed:
            return
        for q in g.partitions.values():
            while q.to_dead_letter:
                offset = q.to_dead_letter.popleft()
                task = asyncio.ensure_future(self._send(g, q, offset))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, g: QueueGroup, q: PartitionQueue, offset: int) -> None:
        e = q.entry(offset)
        if e is None or e.state != DEAD_LETTERING or not self._live(g):
            return
        epoch = q.epoch
        key = (g.name, g.topic, q.partition, offset)
        try:
            record, _ = self._read_one(g.topic, q.partition, offset)
            letter = pb.Record()
            letter.CopyFrom(record)
            for field in ("deliver_at_ms", "delay_ms", "idempotency_key"):
                letter.ClearField(field)
            values = (g.topic, q.partition, offset, g.name, e.deliveries, e.reason, e.first_delivery_ms,
                      e.last_delivery_ms)
            for name, value in zip(DLQ_HEADERS, values, strict=True):
                letter.headers.add(key=f"streamd-dlq-{name}", value=str(value).encode())
            target = self.topic(g)
            _, durable = self.broker.append(target, [], [letter.SerializeToString()])
            await durable
        except CorruptRecords as exc:  # the record is gone: lost, not retried forever
            self._backoff.pop(key, None)
            if q.epoch == epoch and self._live(g):
                self._on_damaged(g, q, exc)
            return
        except Exception as exc:
            delay = min(60.0, self._backoff.get(key, 0.5) * 2)
            self._backoff[key] = delay
            # Said once per group until it works again (a full disk fails every record,
            # every few seconds); the rest at debug level.
            group = (g.name, g.topic)
            failures = self._failing.get(group, 0)
            self._failing[group] = failures + 1
            (log.debug if failures else log.error)(
                "dead-lettering %s/%d offset %d for group %s failed (%s); retrying in %.0f s%s",
                g.topic, q.partition, offset, g.name, exc, delay,
                "" if failures else " (later failures of this group are logged once it works again)",
                extra={"event": "dead_letter_failed", "group": g.name, "topic": g.topic})
            await asyncio.sleep(delay)
            if q.epoch == epoch and q.entry(offset) == e and self._live(g):
                q.to_dead_letter.append(offset)
            return
        self._backoff.pop(key, None)
        failed = self._failing.pop((g.name, g.topic), 0)
        if failed:
            log.warning("dead-lettering for group %s of %s works again, after %d failed attempt(s)",
                        g.name, g.topic, failed, extra={"event": "dead_letter_recovered", "group": g.name,
                                                         "topic": g.topic, "failures": failed})
        if q.epoch == epoch and q.entry(offset) == e and self._live(g):
            q.dead_lettered(offset)
            self._wake(g)  # a full window may have room again
            await self.store.settled(g, q.partition, [offset], kind="d")

    def _live(self, g: QueueGroup) -> bool:
        return self.store.groups.get((g.name, g.topic)) is g

    def topic(self, g: QueueGroup) -> str:
        name = g.dead_letter_topic
        if name not in self.broker.topics:  # checked and created with no await between
            source = self.broker.topic(g.topic).meta.settings
            # Room for the streamd-dlq-* headers on top of the largest source record.
            overrides: dict[str, object] = {
                "max_record_bytes": min(source.max_record_bytes + DLQ_HEADROOM, MAX_RECORD_LIMIT)
            }
            self.broker.create_topic(name, len(g.partitions), overrides)
            log.info("created dead-letter topic %s for queue group %s", name, g.name)
        return name


def check_dead_letter_topic(broker: Broker, g: QueueGroup) -> None:
    field = "config.dead_letter_topic"
    name = g.dead_letter_topic
    limit = broker.max_topic_name_chars
    if not g.config.dead_letter_topic and len(name) > limit:
        # The default "<topic>.dlq" of a long topic name: say where it came from and
        # what to do, rather than reject a name the client never sent.
        raise InvalidGroupRequest(
            field, f"{name[:300]!r} is not a valid topic name: the default dead-letter topic <topic>.dlq is "
            f"{len(name)} characters, over {limit}; set {field} to a shorter name", reason="INVALID_TOPIC_NAME",
        )
    broker.check_topic_name(name, field=field)
    if name == g.topic:
        raise InvalidGroupRequest(field, "must not be the group's own topic")
