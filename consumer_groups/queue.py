"""Queue groups: competing consumers with leases over one partition of a topic.

``PartitionQueue`` is the state of one queue group on one partition, pure logic with
time passed in (no I/O, no clock, no gRPC):

- ``start_offset``: every record below it is settled (acked or dead-lettered);
- ``scan_offset``: the next record to admit from the log; ``[start, scan)`` is the
  window, at most ``max_in_flight`` records wide;
- ``entries``: the unsettled records of the window, each with a state, a delivery
  count and a visible-at time;
- ``settled``: settled offsets above ``start_offset`` (acks arrive out of order).

States of an entry::

    AVAILABLE --lease--> LEASED --ack--> settled
        ^                  |  \\--nack/expiry--> WAITING --(visible_at)--> AVAILABLE
        |                  \\--reject, or nack/expiry at max_deliveries--> DEAD_LETTERING
    WAITING (a delayed record, until its delivery time)        DEAD_LETTERING --dead_lettered()--> settled
    BLOCKED (ordered_by_key: behind an unsettled record of the same key)

Invariants (checked by tests/property/test_queue_model.py):
- an entry is LEASED to at most one lease id at a time; a lease id is never reused;
- ``deliveries <= max_deliveries``; the failure that finds ``deliveries ==
  max_deliveries`` dead-letters the record instead of retrying it;
- an acked record is never handed out again;
- ordered_by_key: at most one entry per key is outside BLOCKED (so one key's records
  are processed in order, and a failing key holds back only itself).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import LeaseExpired
from .retry import RetryPolicy

AVAILABLE, LEASED, WAITING, BLOCKED, DEAD_LETTERING = range(5)
STATE_NAMES = ("available", "leased", "waiting", "blocked", "dead-lettering")
MIN_LEASE_MS = 100
MAX_LEASE_MS = 12 * 3600 * 1000
MAX_REASON_CHARS = 1024
SPAN_FACTOR = 20


@dataclass(frozen=True)
class QueueConfig:
    lease_ms: int = 30_000
    max_deliveries: int = 5
    dead_letter_topic: str = ""  # "" -> "<topic>.dlq"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ordered_by_key: bool = False
    at_most_once: bool = False
    max_in_flight: int = 10_000
    start: str = "earliest"

    def __post_init__(self) -> None:
        check_lease_ms(self.lease_ms)
        if not 1 <= self.max_deliveries <= 1000:
            raise ValueError("max_deliveries must be 1 .. 1000")
        if not 1 <= self.max_in_flight <= 1_000_000:
            raise ValueError("max_in_flight must be 1 .. 1000000")
        if self.start not in ("earliest", "latest"):
            raise ValueError("start must be earliest or latest")


def check_lease_ms(lease_ms: int) -> int:
    if not MIN_LEASE_MS <= lease_ms <= MAX_LEASE_MS:
        raise ValueError(f"lease_ms must be {MIN_LEASE_MS} .. {MAX_LEASE_MS}, not {lease_ms}")
    return lease_ms


class Entry:
    __slots__ = ("offset", "state", "deliveries", "visible_at", "lease_id", "first_delivery_ms",
                 "last_delivery_ms", "reason", "key", "append_time_ms")

    def __init__(self, offset: int, key: bytes | None, append_time_ms: int) -> None:
        self.offset = offset
        self.state = AVAILABLE
        self.deliveries = 0
        self.visible_at = 0  # WAITING: when it becomes available; LEASED: lease expiry
        self.lease_id = 0
        self.first_delivery_ms = 0
        self.last_delivery_ms = 0
        self.reason = ""
        self.key = key
        self.append_time_ms = append_time_ms


@dataclass
class QueueStats:
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    lost_to_retention: int = 0


class PartitionQueue:
    def __init__(
        self,
        partition: int,
        start_offset: int,
        config: QueueConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.partition = partition
        self.start_offset = self.scan_offset = start_offset
        self.config = config
        self.rng = rng or random.Random()
        self.entries: dict[int, Entry] = {}
        self.settled: set[int] = set()
        self.stats = QueueStats()
        self.blocked = 0  # entries in BLOCKED
        # Lease ids: a random 62-bit start per queue object, then counted up, so ids are
        # unique in a run and a lease from before a restart cannot match one after it.
        self._next_lease_id = self.rng.getrandbits(62) + 1
        self._ready: list[int] = []  # heap of AVAILABLE offsets (lazy: recheck on pop)
        self._timers: list[tuple[int, int, int]] = []  # (time, offset, lease_id or 0)
        self._blocked: dict[bytes, deque[int]] = {}  # ordered_by_key: key -> waiting offsets
        self._active_key: dict[bytes, int] = {}  # key -> its one entry outside BLOCKED
        #: Entries decided for the dead-letter topic, for the owner to produce there.
        self.to_dead_letter: deque[int] = deque()
        #: Saved state of records not yet admitted again (after a restart): offset ->
        #: (deliveries, visible_at, reason, first_delivery_ms, last_delivery_ms, dead_letter).
        self.remembered: dict[int, tuple[int, int, str, int, int, bool]] = {}

    # -- admission -------------------------------------------------------------
    def room(self) -> int:
        """How many more records the window can admit: at most ``max_in_flight``
        unsettled records, over a span of at most ``SPAN_FACTOR`` times that (settled
        offsets above the start are kept one by one), so one slow record holds back
        neither the others nor, for a long while, new ones."""
        # BLOCKED records (ordered_by_key) wait behind their key, not in flight: a hot
        # key must not fill the window for the other keys. The span bounds them.
        return min(*self.rooms())

    def rooms(self) -> tuple[int, int]:
        """(room for unsettled records, room in the span): ``room()`` is the smaller."""
        unsettled = self.config.max_in_flight - (len(self.entries) - self.blocked)
        span = self.config.max_in_flight * SPAN_FACTOR - (self.scan_offset - self.start_offset)
        return unsettled, span

    def admit(self, offset: int, *, key: bytes | None, deliver_at_ms: int, append_time_ms: int) -> None:
        """Take the record at ``scan_offset`` into the window."""
        if offset != self.scan_offset:
            raise ValueError(f"admit {offset}: the next record to admit is {self.scan_offset}")
        self.scan_offset += 1
        if offset in self.settled:  # settled before a restart
            self._advance()
            return
        e = self.entries[offset] = Entry(offset, key if self.config.ordered_by_key else None, append_time_ms)
        dead = False
        saved = self.remembered.pop(offset, None)
        if saved is not None:
            e.deliveries, e.visible_at, e.reason, e.first_delivery_ms, e.last_delivery_ms, dead = saved
            deliver_at_ms = max(deliver_at_ms, e.visible_at)
            if e.deliveries >= self.config.max_deliveries and not dead:
                # Its last delivery was in flight at a restart (a lost lease counts as a
                # failure): one more would exceed the limit.
                dead, e.reason = True, e.reason or "lease lost in a broker restart"
        if e.key is not None:
            if e.key in self._active_key:
                e.state = BLOCKED
                self.blocked += 1
                e.visible_at = deliver_at_ms
                self._blocked.setdefault(e.key, deque()).append(offset)
                return
            self._active_key[e.key] = offset
        if dead:
            self._to_dead_letter(e)
        else:
            self._make_visible(e, deliver_at_ms)

    def skip_to(self, log_start_offset: int) -> None:
        """Retention deleted records below ``log_start_offset``: those not yet settled
        are lost to this group (counted, never silent)."""
        if log_start_offset <= self.start_offset:
            return
        lost = 0
        for offset in range(self.start_offset, min(log_start_offset, self.scan_offset)):
            if offset not in self.settled:
                lost += 1
                self._drop(offset)
        lost += max(0, log_start_offset - self.scan_offset)
        self.stats.lost_to_retention += lost
        self._move_start(log_start_offset)

    # -- leasing ---------------------------------------------------------------
    def lease(self, n: int, now: int, lease_ms: int) -> list[Entry]:
        """Lease up to ``n`` available records (lowest offsets first). Call ``expire``
        first: expired leases and due retries are the owner's to persist."""
        out: list[Entry] = []
        while self._ready and len(out) < n:
            offset = heapq.heappop(self._ready)
            e = self.entries.get(offset)
            if e is None or e.state != AVAILABLE:
                continue
            e.deliveries += 1
            if e.deliveries > 1:
                self.stats.redelivered += 1
            e.first_delivery_ms = e.first_delivery_ms or now
            e.last_delivery_ms = now
            e.lease_id = self._next_lease_id
            self._next_lease_id += 1
            if self.config.at_most_once:
                self._settle(e)
                self.stats.acked += 1
            else:
                e.state = LEASED
                e.visible_at = now + lease_ms
                heapq.heappush(self._timers, (e.visible_at, offset, e.lease_id))
            out.append(e)
        return out

    def has_available(self) -> bool:
        while self._ready:
            e = self.entries.get(self._ready[0])
            if e is not None and e.state == AVAILABLE:
                return True
            heapq.heappop(self._ready)
        return False

    def next_timer_ms(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    # -- settling --------------------------------------------------------------
    def ack(self, offset: int, lease_id: int, now: int) -> Entry:
        e = self._leased(offset, lease_id, now)
        self._settle(e)
        self.stats.acked += 1
        return e

    def nack(self, offset: int, lease_id: int, now: int, *, delay_ms: int | None = None, reason: str = "") -> Entry:
        e = self._leased(offset, lease_id, now)
        self._failed(e, now, delay_ms=delay_ms, reason=reason or "nacked")
        return e

    def extend(self, offset: int, lease_id: int, now: int, lease_ms: int) -> int:
        e = self._leased(offset, lease_id, now)
        e.visible_at = now + check_lease_ms(lease_ms)
        heapq.heappush(self._timers, (e.visible_at, offset, e.lease_id))
        return e.visible_at

    def reject(self, offset: int, lease_id: int, now: int, *, reason: str = "") -> Entry:
        e = self._leased(offset, lease_id, now)
        e.reason = (reason or "rejected")[:MAX_REASON_CHARS]
        self._to_dead_letter(e)
        return e

    def dead_lettered(self, offset: int) -> None:
        """The owner produced the record to the dead-letter topic."""
        e = self.entries.get(offset)
        if e is not None and e.state == DEAD_LETTERING:
            self._settle(e)
            self.stats.dead_lettered += 1

    def expire(self, now: int) -> list[Entry]:
        """Apply due timers: expired leases fail (retry or dead letter), waiting
        records become available. Returns the entries whose lease expired."""
        expired = []
        while self._timers and self._timers[0][0] <= now:
            when, offset, lease_id = heapq.heappop(self._timers)
            e = self.entries.get(offset)
            if e is None or e.visible_at != when:
                continue  # settled, extended or re-timed since
            if e.state == LEASED and e.lease_id == lease_id:
                expired.append(e)
                self._failed(e, now, delay_ms=None, reason="lease expired")
            elif e.state == WAITING and lease_id == 0:
                e.state = AVAILABLE
                heapq.heappush(self._ready, offset)
        return expired

    # -- seek ----------------------------------------------------------------------
    def seek(self, offset: int) -> None:
        """Restart at ``offset``: records before it count as settled, records from it
        on are delivered again (delivery counts start over). Leases are dropped."""
        for e in list(self.entries.values()):
            self._drop(e.offset)
        self.entries.clear()
        self.settled.clear()
        self.remembered.clear()
        self._ready.clear()
        self._timers.clear()
        self._blocked.clear()
        self._active_key.clear()
        self.to_dead_letter.clear()
        self.blocked = 0
        self.start_offset = self.scan_offset = offset

    # -- views -----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATE_NAMES, 0)
        for e in self.entries.values():
            out[STATE_NAMES[e.state]] += 1
        return out

    def oldest_unsettled(self) -> Entry | None:
        return self.entries.get(self.start_offset) if self.start_offset < self.scan_offset else None

    # -- internals -------------------------------------------------------------
    def _leased(self, offset: int, lease_id: int, now: int) -> Entry:
        e = self.entries.get(offset)
        if e is None or e.state != LEASED or e.lease_id != lease_id:
            raise LeaseExpired(self.partition, offset, "not held by this lease (expired, settled or another's)")
        if now >= e.visible_at:
            raise LeaseExpired(self.partition, offset, "expired")
        return e

    def _failed(self, e: Entry, now: int, *, delay_ms: int | None, reason: str) -> None:
        e.reason = reason[:MAX_REASON_CHARS]
        if e.deliveries >= self.config.max_deliveries:
            self._to_dead_letter(e)
            return
        if delay_ms is None:
            delay_ms = self.config.retry.delay_ms(e.deliveries, self.rng)
        self._make_visible(e, now + max(0, delay_ms))

    def _make_visible(self, e: Entry, at_ms: int) -> None:
        e.lease_id = 0
        e.visible_at = at_ms
        if at_ms > 0:
            e.state = WAITING
            heapq.heappush(self._timers, (at_ms, e.offset, 0))
        else:
            e.state = AVAILABLE
            heapq.heappush(self._ready, e.offset)

    def _to_dead_letter(self, e: Entry) -> None:
        e.state = DEAD_LETTERING
        e.lease_id = 0
        self.to_dead_letter.append(e.offset)

    def _settle(self, e: Entry) -> None:
        del self.entries[e.offset]
        e.lease_id = 0
        self.settled.add(e.offset)
        self._release_key(e)
        self._advance()

    def _drop(self, offset: int) -> None:
        e = self.entries.pop(offset, None)
        if e is not None:
            if e.state == BLOCKED:
                self.blocked -= 1
            self._release_key(e)
        self.settled.discard(offset)

    def _release_key(self, e: Entry) -> None:
        if e.key is None or self._active_key.get(e.key) != e.offset:
            return
        del self._active_key[e.key]
        waiting = self._blocked.get(e.key)
        while waiting:
            nxt = self.entries.get(waiting.popleft())
            if nxt is not None and nxt.state == BLOCKED:
                if not waiting:
                    del self._blocked[e.key]
                self.blocked -= 1
                self._active_key[e.key] = nxt.offset
                self._make_visible(nxt, nxt.visible_at)
                return
        self._blocked.pop(e.key, None)

    def _advance(self) -> None:
        start = self.start_offset
        while start in self.settled:
            self.settled.discard(start)
            start += 1
        self.start_offset = start

    def _move_start(self, offset: int) -> None:
        self.start_offset = max(self.start_offset, offset)
        self.scan_offset = max(self.scan_offset, offset)
        for o in [o for o in self.settled if o < offset]:
            self.settled.discard(o)
        self._advance()


def settled_ranges(offsets: Iterable[int]) -> list[list[int]]:
    """Compress a set of offsets into sorted [first, last] ranges (for snapshots)."""
    out: list[list[int]] = []
    for o in sorted(offsets):
        if out and out[-1][1] == o - 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return out


def expand_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for first, last in ranges:
        if last < first or last - first > 10_000_000:
            raise ValueError(f"bad range {first}..{last}")
        out.update(range(first, last + 1))
    return out

