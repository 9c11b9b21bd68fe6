"""Queue groups: competing consumers with leases over one partition of a topic.

``PartitionQueue`` is the state of one queue group on one partition, pure logic with
time passed in (no I/O, no clock, no gRPC):

- ``start_offset``: every record below it is settled (acked or dead-lettered);
- ``scan_offset``: the next record to admit from the log; ``[start, scan)`` is the
  window, at most ``max_in_flight`` unsettled records and ``SPAN_FACTOR`` times that
  wide;
- per record of the window, in numpy arrays indexed by ``offset - base``: a state, a
  delivery count, a lease id, a visible-at time (lease expiry, or when a waiting
  record becomes available), first and last delivery times and the append time.
  Reasons (failed records) and keys (``ordered_by_key`` groups) are kept sparsely.

Work is done per **run** of records, not per record, wherever the records share
their fate: records are admitted a batch at a time, one ``lease`` call leases any
number of records under one lease id with one timer, and acks and extensions come
as offset ranges (as Kafka's share groups do: acquired-records and acknowledgement
ranges). Per-record work is left to what is rare: failures, delays, ordered keys.

States::

    AVAILABLE --lease--> LEASED --ack--> SETTLED
        ^                  |  \\--nack/expiry--> WAITING --(visible_at)--> AVAILABLE
        |                  \\--reject, or nack/expiry at max_deliveries--> DEAD_LETTERING
    WAITING (a delayed record, until its delivery time)      DEAD_LETTERING --dead_lettered()--> SETTLED
    BLOCKED (ordered_by_key: behind an unsettled record of the same key)

Invariants (checked by tests/property/test_queue_model.py):
- a record is LEASED to at most one lease id at a time; a lease id is never reused;
- ``deliveries <= max_deliveries``; the failure that finds ``deliveries ==
  max_deliveries`` dead-letters the record instead of retrying it;
- a settled record is never handed out again;
- ordered_by_key: at most one record per key is outside BLOCKED (so one key's records
  are processed in order, and a failing key holds back only itself).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ..errors import LeaseExpired
from .retry import RetryPolicy

FREE, AVAILABLE, LEASED, WAITING, BLOCKED, DEAD_LETTERING, SETTLED = range(7)
#: Names of the unsettled states, as ``counts()`` reports them.
STATE_NAMES = ("available", "leased", "waiting", "blocked", "dead-lettering")
MIN_LEASE_MS = 100
MAX_LEASE_MS = 12 * 3600 * 1000
MAX_REASON_CHARS = 1024
SPAN_FACTOR = 20
#: Unsettled records per partition window at most (SQS allows about 120,000 in flight
#: per queue). The span, ``SPAN_FACTOR`` times it, bounds the window's arrays (about
#: 40 bytes a record) and a snapshot's settled runs.
MAX_IN_FLIGHT = 100_000
MIN_CAPACITY = 1024
#: The timer heap is cleared of timers that can no longer act (their lease settled
#: or extended, their retry done) once it holds this many more than twice the
#: window's unsettled records: a settled lease's timer would otherwise stay until
#: its expiry (up to MAX_LEASE_MS), however many receives come meanwhile.
TIMER_SLACK = 1024
#: Per-record arrays of the window, indexed by ``offset - base``.
_ARRAYS = ("_state", "_deliveries", "_lease", "_visible", "_first", "_last", "_append")
_DTYPES = (np.uint8, np.int32, np.int64, np.int64, np.int64, np.int64, np.int64)


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
        if not 1 <= self.max_in_flight <= MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight must be 1 .. {MAX_IN_FLIGHT}")
        if self.start not in ("earliest", "latest"):
            raise ValueError("start must be earliest or latest")


def check_lease_ms(lease_ms: int) -> int:
    if not MIN_LEASE_MS <= lease_ms <= MAX_LEASE_MS:
        raise ValueError(f"lease_ms must be {MIN_LEASE_MS} .. {MAX_LEASE_MS}, not {lease_ms}")
    return lease_ms


class Entry(NamedTuple):
    """One unsettled record of the window, as it is now (a copy, not a handle)."""

    offset: int
    state: int
    deliveries: int
    visible_at: int  # WAITING/BLOCKED: when it becomes available; LEASED: lease expiry
    lease_id: int
    first_delivery_ms: int
    last_delivery_ms: int
    reason: str
    key: bytes | None
    append_time_ms: int


@dataclass
class Lease:
    """Records leased by one ``lease`` call: one lease id, one expiry."""

    lease_id: int  # 0: at-most-once (settled when handed out)
    expires_ms: int
    offsets: np.ndarray  # ascending
    deliveries: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def runs(self) -> list[tuple[int, int, int]]:
        """(first_offset, last_offset, deliveries) of consecutive offsets with the same
        delivery count."""
        o, d = self.offsets, self.deliveries
        return [(int(o[a]), int(o[b]), int(d[a])) for a, b in run_bounds(o, d)]

    def records(self) -> list[tuple[int, int]]:
        """(offset, deliveries) of each record."""
        return list(zip(self.offsets.tolist(), self.deliveries.tolist(), strict=True))


@dataclass
class QueueStats:
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    lost_to_retention: int = 0
    #: Records a damaged log made unreadable before the group settled them.
    lost_to_corruption: int = 0
    #: Leases that ran out before a settle, since start-up (not persisted: a metric).
    lease_expired: int = 0


class PartitionQueue:
    # The window's per-record arrays (``_ARRAYS``), indexed by ``offset - base``; made,
    # cleared and moved together by ``_alloc`` and ``_reserve``.
    _state: npt.NDArray[np.uint8]
    _deliveries: npt.NDArray[np.int32]
    _lease: npt.NDArray[np.int64]
    _visible: npt.NDArray[np.int64]
    _first: npt.NDArray[np.int64]
    _last: npt.NDArray[np.int64]
    _append: npt.NDArray[np.int64]

    def __init__(
        self,
        partition: int,
        start_offset: int,
        config: QueueConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.partition = partition
        self.config = config
        self.rng = rng or random.Random()
        self.stats = QueueStats()
        # Lease ids: a random 62-bit start per queue object, then counted up, so ids are
        # unique in a run and a lease from before a restart cannot match one after it.
        self._next_lease_id = self.rng.getrandbits(62) + 1
        #: Entries decided for the dead-letter topic, for the owner to produce there.
        self.to_dead_letter: deque[int] = deque()
        #: Saved state of records not yet admitted again (after a restart): offset ->
        #: (deliveries, visible_at, reason, first_delivery_ms, last_delivery_ms, dead_letter).
        self.remembered: dict[int, tuple[int, int, str, int, int, bool]] = {}
        #: Offsets at or above ``scan_offset`` settled before a restart (journal replay).
        self.settled_ahead: set[int] = set()
        self._alloc(start_offset, MIN_CAPACITY)

    def _alloc(self, offset: int, capacity: int) -> None:
        """An empty window at ``offset``: every array cell zero (cells at or above
        ``scan_offset`` always are, so admitted records start from zero)."""
        self.start_offset = self.scan_offset = self.base = offset
        #: Counts window restarts (seek, retention): an offset's record of an older
        #: epoch is not the one of the window now.
        self.epoch = getattr(self, "epoch", 0) + 1
        if getattr(self, "_state", None) is not None and len(self._state) == capacity:
            for name in _ARRAYS:
                getattr(self, name)[:] = 0
        else:
            for name, dtype in zip(_ARRAYS, _DTYPES, strict=True):
                setattr(self, name, np.zeros(capacity, dtype))
        self._reason: dict[int, str] = {}
        self._keys: dict[int, bytes] = {}
        self._timers: list[tuple[int, int, int, int]] = []  # (time, lease_id or 0, first, last)
        self._hint = offset  # no record below it is AVAILABLE
        self._blocked: dict[bytes, deque[int]] = {}  # ordered_by_key: key -> waiting offsets
        self._active_key: dict[bytes, int] = {}  # key -> its one record outside BLOCKED
        self.open = 0  # unsettled records in the window
        self.blocked = 0  # records in BLOCKED

    # -- admission -------------------------------------------------------------
    def room(self) -> int:
        """How many more records the window can admit: at most ``max_in_flight``
        unsettled records, over a span of at most ``SPAN_FACTOR`` times that (settled
        records above the start still take a place), so one slow record holds back
        neither the others nor, for a long while, new ones."""
        return min(*self.rooms())

    def rooms(self) -> tuple[int, int]:
        """(room for unsettled records, room in the span): ``room()`` is the smaller."""
        # BLOCKED records (ordered_by_key) wait behind their key, not in flight: a hot
        # key must not fill the window for the other keys. The span bounds them.
        unsettled = self.config.max_in_flight - (self.open - self.blocked)
        span = self.config.max_in_flight * SPAN_FACTOR - (self.scan_offset - self.start_offset)
        return unsettled, span

    def plain(self) -> bool:
        """Whether records can be admitted a run at a time (``admit_run``): no keys
        to order by and no state remembered from before a restart."""
        return not (self.config.ordered_by_key or self.remembered or self.settled_ahead)

    def admit_run(self, offset: int, count: int, append_time_ms: int) -> None:
        """Admit ``count`` records from ``scan_offset`` that are available at once (no
        delivery time, no key to order by, nothing remembered: see ``plain``)."""
        if offset != self.scan_offset:
            raise ValueError(f"admit {offset}: the next record to admit is {self.scan_offset}")
        if not self.plain():
            raise ValueError("admit_run needs a plain window")
        self._reserve(offset + count)
        i = offset - self.base
        self._state[i:i + count] = AVAILABLE
        self._append[i:i + count] = append_time_ms
        self.scan_offset += count
        self.open += count

    def admit(self, offset: int, *, key: bytes | None, deliver_at_ms: int, append_time_ms: int) -> None:
        """Take the record at ``scan_offset`` into the window."""
        if offset != self.scan_offset:
            raise ValueError(f"admit {offset}: the next record to admit is {self.scan_offset}")
        self._reserve(offset + 1)
        i = offset - self.base
        self.scan_offset += 1
        if offset in self.settled_ahead:  # settled before a restart
            self.settled_ahead.discard(offset)
            self._state[i] = SETTLED
            self._advance()
            return
        self.open += 1
        self._append[i] = append_time_ms
        dead = False
        saved = self.remembered.pop(offset, None)
        if saved is not None:
            d, visible, reason, first, last, dead = saved
            self._deliveries[i], self._first[i], self._last[i] = d, first, last
            if reason:
                self._reason[offset] = reason
            deliver_at_ms = max(deliver_at_ms, visible)
            if d >= self.config.max_deliveries and not dead:
                # Its last delivery was in flight at a restart (a lost lease counts as a
                # failure): one more would exceed the limit.
                dead = True
                self._reason.setdefault(offset, "lease lost in a broker restart")
        if self.config.ordered_by_key and key is not None:
            self._keys[offset] = key
            if key in self._active_key:
                self._state[i] = BLOCKED
                self.blocked += 1
                self._visible[i] = deliver_at_ms
                self._blocked.setdefault(key, deque()).append(offset)
                return
            self._active_key[key] = offset
        if dead:
            self._to_dead_letter(offset)
        else:
            self._make_visible(offset, deliver_at_ms)

    def skip_to(self, log_start_offset: int) -> None:
        """Retention deleted records below ``log_start_offset``: those not yet settled
        are lost to this group (counted, never silent)."""
        if log_start_offset <= self.start_offset:
            return
        end = min(log_start_offset, self.scan_offset)
        lost = 0
        if end > self.start_offset:
            a, b = self.start_offset - self.base, end - self.base
            gone = np.flatnonzero(self._state[a:b] != SETTLED) + self.start_offset
            lost = len(gone)
            for offset in gone.tolist():
                self._drop(offset)
        # Not admitted yet: lost, but for those settled before a restart.
        lost += max(0, log_start_offset - self.scan_offset)
        lost -= sum(1 for o in self.settled_ahead if self.scan_offset <= o < log_start_offset)
        self.stats.lost_to_retention += lost
        if log_start_offset >= self.scan_offset:
            self._restart_at(log_start_offset)
        else:
            self.start_offset = log_start_offset
            self._hint = max(self._hint, log_start_offset)
            self._advance()
        self.settled_ahead = {o for o in self.settled_ahead if o >= self.scan_offset}
        for o in [o for o in self.remembered if o < self.scan_offset]:
            del self.remembered[o]

    def skip_damaged(self, first: int, last: int) -> list[tuple[int, int]]:
        """Offsets ``first .. last`` cannot be read (a damaged log): their records are
        lost to this group, counted in ``lost_to_corruption`` (never silent), and
        settled, so the window moves on. Those in the window go at once; those not yet
        admitted go if the window can span them (always once it is empty), else on a
        later call. Returns the (first, last) ranges settled, for the journal."""
        done: list[tuple[int, int]] = []
        lost = 0
        a, b = max(first, self.start_offset), min(last, self.scan_offset - 1)
        if a <= b:
            gone = np.flatnonzero(self._state[a - self.base:b - self.base + 1] != SETTLED) + a
            for offset in gone.tolist():
                self._drop(offset)
            lost += len(gone)
            done.append((a, b))
            self._advance()
        if first <= self.scan_offset <= last:
            scan = self.scan_offset
            ahead = last + 1 - scan
            if self.start_offset == scan:
                self._restart_at(last + 1)
            elif last + 1 - self.start_offset <= self.config.max_in_flight * SPAN_FACTOR:
                self._reserve(last + 1)
                self._state[scan - self.base:last + 1 - self.base] = SETTLED
                self.scan_offset = last + 1
            else:
                ahead = 0
            if ahead:
                lost += ahead - sum(1 for o in self.settled_ahead if scan <= o <= last)
                self.forget(scan, last)
                done.append((scan, last))
                self._advance()
        self.stats.lost_to_corruption += lost
        return done

    # -- leasing ---------------------------------------------------------------
    def lease(self, n: int, now: int, lease_ms: int) -> Lease | None:
        """Lease up to ``n`` available records (lowest offsets first) under one lease
        id. Call ``expire`` first: expired leases and due retries are the owner's to
        persist."""
        return self.take(self.pick(n), now, lease_ms)

    def pick(self, n: int) -> np.ndarray:
        """The offsets ``lease(n)`` would lease (ascending), changing nothing: the owner
        may ``take`` a prefix of them (say, what fits in an answer)."""
        if n <= 0:
            return np.empty(0, np.int64)
        lo, hi = self._hint - self.base, self.scan_offset - self.base
        found = np.flatnonzero(self._state[lo:hi] == AVAILABLE)
        if not len(found):
            self._hint = self.scan_offset
            return found
        self._hint = self.base + lo + int(found[0])  # nothing below it is available
        return found[:n] + (lo + self.base)

    def take(self, offsets: np.ndarray, now: int, lease_ms: int) -> Lease | None:
        """Lease ``offsets``, a prefix of what ``pick`` just returned, under one lease id
        (at-most-once: hand them out settled)."""
        if not len(offsets):
            return None
        first, last = int(offsets[0]) - self.base, int(offsets[-1]) - self.base
        # One contiguous run (the usual case): slices, not fancy indexing.
        idx = slice(first, last + 1) if last - first == len(offsets) - 1 else offsets - self.base
        if not (self._state[idx] == AVAILABLE).all():
            raise ValueError("take: every offset must be available (a prefix of pick)")
        self._hint = last + 1 + self.base  # every available record below it was picked
        d = self._deliveries[idx] + 1
        self._deliveries[idx] = d
        self.stats.redelivered += int(np.count_nonzero(d > 1))
        f = self._first[idx]
        self._first[idx] = np.where(f == 0, now, f)
        self._last[idx] = now
        if self.config.at_most_once:
            self._state[idx] = SETTLED
            self.open -= len(offsets)
            self.stats.acked += len(offsets)
            for offset in offsets.tolist() if self._keys else ():
                self._release_key(offset)
            for offset in offsets.tolist() if self._reason else ():  # remembered from before a restart
                self._reason.pop(offset, None)
            self._advance()
            return Lease(0, 0, offsets, d)
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        expires = now + lease_ms
        self._state[idx] = LEASED
        self._lease[idx] = lease_id
        self._visible[idx] = expires
        self._push_timer(expires, lease_id, int(offsets[0]), int(offsets[-1]))
        return Lease(lease_id, expires, offsets, d)

    def next_timer_ms(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    # -- settling --------------------------------------------------------------
    def ack(self, offset: int, lease_id: int, now: int) -> None:
        self._leased(offset, lease_id, now)
        self._settle(offset)
        self.stats.acked += 1

    def ack_range(self, first: int, last: int, lease_id: int, now: int) -> np.ndarray:
        """Ack every offset in ``first .. last`` that ``lease_id`` holds; returns them
        (the others are left as they are)."""
        held, a, b = self._held(first, last, lease_id, now)
        if not len(held):
            return held
        if len(held) == b - a:
            self._state[a:b] = SETTLED
        else:
            self._state[held - self.base] = SETTLED
        self.open -= len(held)
        self.stats.acked += len(held)
        for offset in held.tolist() if self._keys else ():
            self._release_key(offset)
        if self._reason:  # records that failed before: their reasons go with them
            if len(self._reason) < len(held):
                for offset in [o for o in self._reason if o < self.start_offset or self._state_of(o) == SETTLED]:
                    del self._reason[offset]
            else:
                for offset in held.tolist():
                    self._reason.pop(offset, None)
        self._advance()
        return held

    def extend_range(self, first: int, last: int, lease_id: int, now: int, lease_ms: int) -> tuple[np.ndarray, int]:
        """Extend the lease of every offset in ``first .. last`` that ``lease_id``
        holds: (those offsets, the new expiry)."""
        expires = now + check_lease_ms(lease_ms)
        held, a, b = self._held(first, last, lease_id, now)
        if len(held):
            self._visible[held - self.base] = expires
            self._push_timer(expires, lease_id, int(held[0]), int(held[-1]))
        return held, expires

    def nack(self, offset: int, lease_id: int, now: int, *, delay_ms: int | None = None, reason: str = "") -> Entry:
        self._leased(offset, lease_id, now)
        self._failed(offset, now, delay_ms=delay_ms, reason=reason or "nacked")
        return self._unsettled(offset)

    def extend(self, offset: int, lease_id: int, now: int, lease_ms: int) -> int:
        self._leased(offset, lease_id, now)
        expires = now + check_lease_ms(lease_ms)
        self._visible[offset - self.base] = expires
        self._push_timer(expires, lease_id, offset, offset)
        return expires

    def reject(self, offset: int, lease_id: int, now: int, *, reason: str = "") -> Entry:
        self._leased(offset, lease_id, now)
        self._reason[offset] = (reason or "rejected")[:MAX_REASON_CHARS]
        self._to_dead_letter(offset)
        return self._unsettled(offset)

    def dead_lettered(self, offset: int) -> None:
        """The owner produced the record to the dead-letter topic."""
        if self._state_of(offset) == DEAD_LETTERING:
            self._settle(offset)
            self.stats.dead_lettered += 1

    def expire(self, now: int) -> list[Entry]:
        """Apply due timers: expired leases fail (retry or dead letter), waiting
        records become available. Returns the records whose lease expired."""
        expired: list[Entry] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, lease_id, first, last = heapq.heappop(timers)
            a, b = max(first, self.start_offset) - self.base, min(last + 1, self.scan_offset) - self.base
            if a >= b:
                continue  # settled or gone since
            state = self._state[a:b]
            if lease_id:
                due = np.flatnonzero((state == LEASED) & (self._lease[a:b] == lease_id) & (self._visible[a:b] <= now))
                for offset in (due + a + self.base).tolist():
                    self._failed(offset, now, delay_ms=None, reason="lease expired")
                    expired.append(self._unsettled(offset))
                self.stats.lease_expired += len(due)
            else:
                due = np.flatnonzero((state == WAITING) & (self._visible[a:b] == when))
                if len(due):
                    state[due] = AVAILABLE
                    self._hint = min(self._hint, int(due[0]) + a + self.base)
        return expired

    # -- seek ----------------------------------------------------------------------
    def seek(self, offset: int) -> None:
        """Restart at ``offset``: records before it count as settled, records from it
        on are delivered again (delivery counts start over). Leases are dropped."""
        self.remembered.clear()
        self.settled_ahead.clear()
        self.to_dead_letter.clear()
        self._restart_at(offset)

    # -- views -----------------------------------------------------------------
    def entry(self, offset: int) -> Entry | None:
        """The unsettled record at ``offset`` of the window, or None."""
        state = self._state_of(offset)
        if state in (FREE, SETTLED):
            return None
        i = offset - self.base
        return Entry(offset, state, int(self._deliveries[i]), int(self._visible[i]),
                     int(self._lease[i]) if state == LEASED else 0, int(self._first[i]), int(self._last[i]),
                     self._reason.get(offset, ""), self._keys.get(offset), int(self._append[i]))

    def _unsettled(self, offset: int) -> Entry:
        """The entry of a record the window holds unsettled (an invariant where called)."""
        e = self.entry(offset)
        if e is None:
            raise AssertionError(f"offset {offset} is not an unsettled record of the window")
        return e

    def entries(self, *, delivered_only: bool = False) -> list[Entry]:
        """The window's unsettled records (``delivered_only``: those delivered at least
        once, waiting or being dead-lettered: what a snapshot keeps)."""
        a, b = self.start_offset - self.base, self.scan_offset - self.base
        state = self._state[a:b]
        mask = (state != SETTLED)
        if delivered_only:
            mask &= (self._deliveries[a:b] > 0) | (state == WAITING) | (state == DEAD_LETTERING)
        return [self._unsettled(o) for o in (np.flatnonzero(mask) + self.start_offset).tolist()]

    def is_settled(self, offset: int) -> bool:
        """Settled (acked or dead-lettered), as far as this window knows."""
        return offset < self.start_offset or self._state_of(offset) == SETTLED or offset in self.settled_ahead

    def settled_above_start(self) -> list[tuple[int, int]]:
        """Settled offsets above ``start_offset`` as [first, last] ranges (snapshots)."""
        a, b = self.start_offset - self.base, self.scan_offset - self.base
        done = np.flatnonzero(self._state[a:b] == SETTLED) + self.start_offset
        return offset_runs(done.tolist() + sorted(self.settled_ahead))

    def counts(self) -> dict[str, int]:
        a, b = self.start_offset - self.base, self.scan_offset - self.base
        per_state = np.bincount(self._state[a:b], minlength=SETTLED + 1)
        return {name: int(per_state[s]) for s, name in enumerate(STATE_NAMES, start=AVAILABLE)}

    def oldest_unsettled_append_ms(self) -> int | None:
        if self.start_offset >= self.scan_offset:
            return None
        return int(self._append[self.start_offset - self.base])

    # -- internals -------------------------------------------------------------
    def _state_of(self, offset: int) -> int:
        if not self.start_offset <= offset < self.scan_offset:
            return FREE
        return int(self._state[offset - self.base])

    def _leased(self, offset: int, lease_id: int, now: int) -> None:
        i = offset - self.base
        if self._state_of(offset) != LEASED or int(self._lease[i]) != lease_id:
            raise LeaseExpired(self.partition, offset, "not held by this lease (expired, settled or another's)")
        if now >= self._visible[i]:
            raise LeaseExpired(self.partition, offset, "expired")

    def held(self, first: int, last: int, lease_id: int, now: int) -> np.ndarray:
        """Offsets in ``first .. last`` that ``lease_id`` holds (not expired)."""
        return self._held(first, last, lease_id, now)[0]

    def _held(self, first: int, last: int, lease_id: int, now: int) -> tuple[np.ndarray, int, int]:
        """Offsets in ``first .. last`` held by ``lease_id`` and not expired."""
        if last < first:
            raise ValueError(f"bad range {first}..{last}")
        a, b = max(first, self.start_offset) - self.base, min(last + 1, self.scan_offset) - self.base
        if a >= b:
            return np.empty(0, np.int64), 0, 0
        held = np.flatnonzero((self._state[a:b] == LEASED) & (self._lease[a:b] == lease_id)
                              & (self._visible[a:b] > now))
        return held + (a + self.base), a, b

    def _failed(self, offset: int, now: int, *, delay_ms: int | None, reason: str) -> None:
        self._reason[offset] = reason[:MAX_REASON_CHARS]
        deliveries = int(self._deliveries[offset - self.base])
        if deliveries >= self.config.max_deliveries:
            self._to_dead_letter(offset)
            return
        if delay_ms is None:
            delay_ms = self.config.retry.delay_ms(deliveries, self.rng)
        self._make_visible(offset, now + max(0, delay_ms))

    def _make_visible(self, offset: int, at_ms: int) -> None:
        i = offset - self.base
        self._visible[i] = at_ms
        if at_ms > 0:
            self._state[i] = WAITING
            self._push_timer(at_ms, 0, offset, offset)
        else:
            self._state[i] = AVAILABLE
            if offset < self._hint:
                self._hint = offset

    def _push_timer(self, when: int, lease_id: int, first: int, last: int) -> None:
        """A timer for the records ``first .. last``: those of ``lease_id`` whose lease
        ends at ``when`` (0: those WAITING until ``when``)."""
        if len(self._timers) > TIMER_SLACK + 2 * self.open:
            # In place: ``expire`` may be popping from this list (a retry pushes one).
            self._timers[:] = [t for t in self._timers if self._timer_live(*t)]
            heapq.heapify(self._timers)
        heapq.heappush(self._timers, (when, lease_id, first, last))

    def _timer_live(self, when: int, lease_id: int, first: int, last: int) -> bool:
        """Whether ``expire`` could still act on the timer: a record it covers has
        its visible time at ``when`` (each LEASED or WAITING record got a timer for
        its visible time when it was set, so the others are redundant)."""
        a, b = max(first, self.start_offset) - self.base, min(last + 1, self.scan_offset) - self.base
        if a >= b:
            return False
        mine = self._visible[a:b] == when
        if lease_id:
            mine &= (self._state[a:b] == LEASED) & (self._lease[a:b] == lease_id)
        else:
            mine &= self._state[a:b] == WAITING
        return bool(mine.any())

    def _to_dead_letter(self, offset: int) -> None:
        self._state[offset - self.base] = DEAD_LETTERING
        self.to_dead_letter.append(offset)

    def _settle(self, offset: int) -> None:
        self._state[offset - self.base] = SETTLED
        self.open -= 1
        self._reason.pop(offset, None)
        if self._keys:
            self._release_key(offset)
        self._advance()

    def _drop(self, offset: int) -> None:
        """Forget an unsettled record (retention deleted it)."""
        i = offset - self.base
        if self._state[i] == BLOCKED:
            self.blocked -= 1
        self._release_key(offset)
        self._state[i] = SETTLED
        self.open -= 1
        self._reason.pop(offset, None)
        self._keys.pop(offset, None)

    def _release_key(self, offset: int) -> None:
        key = self._keys.pop(offset, None)
        if key is None or self._active_key.get(key) != offset:
            return
        del self._active_key[key]
        waiting = self._blocked.get(key)
        while waiting:
            nxt = waiting.popleft()
            if self._state_of(nxt) == BLOCKED:
                if not waiting:
                    del self._blocked[key]
                self.blocked -= 1
                self._active_key[key] = nxt
                self._make_visible(nxt, int(self._visible[nxt - self.base]))
                return
        self._blocked.pop(key, None)

    def _advance(self) -> None:
        """Move ``start_offset`` past the settled records at the front."""
        a, b = self.start_offset - self.base, self.scan_offset - self.base
        if a >= b or self._state[a] != SETTLED:
            return
        rest = self._state[a:b] != SETTLED
        self.start_offset = self.base + (a + int(rest.argmax()) if rest.any() else b)
        if self._hint < self.start_offset:
            self._hint = self.start_offset

    def _reserve(self, end: int) -> None:
        """Room in the arrays for offsets up to ``end``: shift the live part down to
        ``start_offset`` or grow (doubling)."""
        capacity = len(self._state)
        if end - self.base <= capacity:
            return
        live = self.scan_offset - self.start_offset
        need = end - self.start_offset
        if need > capacity // 2 or live > capacity // 2:
            capacity = max(2 * capacity, need)
        a, b = self.start_offset - self.base, self.scan_offset - self.base
        for name in _ARRAYS:
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype) if capacity != len(old) else old
            new[:live] = old[a:b]
            if new is old:
                new[live:] = 0
            setattr(self, name, new)
        self.base = self.start_offset

    def _restart_at(self, offset: int) -> None:
        """An empty window at ``offset`` (statistics are kept)."""
        self._alloc(offset, min(len(self._state), 4 * MIN_CAPACITY))

    def move_to(self, offset: int) -> None:
        """Journal replay (the window is empty): every record below ``offset`` is
        settled or gone."""
        if self.scan_offset != self.start_offset:
            raise ValueError("move_to is for an empty window")
        start = self.start_offset
        if offset > start:
            self._restart_at(offset)
            # Nothing below the old start is remembered (replay keeps it so): only
            # what lies between the two goes, not a scan of all (once per ack).
            self.forget(start, offset - 1)

    def forget(self, first: int, last: int) -> None:
        """Drop what ``remembered`` and ``settled_ahead`` hold of ``first .. last``
        (journal replay), in time bounded by the smaller of the range and them."""
        if last - first + 1 <= len(self.remembered) + len(self.settled_ahead):
            for o in range(first, last + 1):
                self.remembered.pop(o, None)
                self.settled_ahead.discard(o)
            return
        for o in [o for o in self.remembered if first <= o <= last]:
            del self.remembered[o]
        self.settled_ahead.difference_update([o for o in self.settled_ahead if first <= o <= last])


def run_bounds(offsets: np.ndarray, values: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Index bounds ``(a, b)`` (inclusive) of the runs of consecutive ascending
    ``offsets`` (that also share their ``values``, if given)."""
    n = len(offsets)
    if not n:
        return []
    if offsets[-1] - offsets[0] == n - 1 and (values is None or (values == values[0]).all()):
        return [(0, n - 1)]  # one run: the usual case
    breaks = np.diff(offsets) != 1
    if values is not None:
        breaks |= np.diff(values) != 0
    cuts = np.flatnonzero(breaks) + 1
    return list(zip(np.concatenate(([0], cuts)).tolist(), (np.concatenate((cuts, [n])) - 1).tolist(), strict=True))


def offset_runs(offsets: Iterable[int] | np.ndarray) -> list[tuple[int, int]]:
    """Ascending offsets as (first, last) runs of consecutive offsets."""
    o = np.asarray(offsets if isinstance(offsets, np.ndarray) else list(offsets), dtype=np.int64)
    return [(int(o[a]), int(o[b])) for a, b in run_bounds(o)]


def expand_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for first, last in ranges:
        if last < first or last - first > 10_000_000:
            raise ValueError(f"bad range {first}..{last}")
        out.update(range(first, last + 1))
    return out
