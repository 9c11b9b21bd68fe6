"""PartitionQueue against a model, driven by a fake clock: no record is leased twice
at once, delivery counts stay within the limit, dead-lettering happens exactly at the
limit, backoff delays stay within the policy's bounds, acked records never come back,
ordered keys have one record in flight."""

from __future__ import annotations

import json
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import consumer_groups.queue.window as queue_module
from consumer_groups.errors import LeaseExpired
from consumer_groups.queue.retry import RetryPolicy
from consumer_groups.queue.store import QueueGroup, QueueStore
from consumer_groups.queue.window import BLOCKED, DEAD_LETTERING, LEASED, WAITING, PartitionQueue, QueueConfig

MAX_DELIVERIES = 3
POLICY = RetryPolicy(initial_delay_ms=100, multiplier=2.0, max_delay_ms=1000, jitter="equal")


class QueueMachine(RuleBasedStateMachine):
    ORDERED = True
    AT_MOST_ONCE = False

    def __init__(self) -> None:
        super().__init__()
        # Small arrays, so the window's arrays shift and grow within a few steps.
        self._capacity, queue_module.MIN_CAPACITY = queue_module.MIN_CAPACITY, 8
        # No slack: the timer heap is cleared of dead timers at every push.
        self._slack, queue_module.TIMER_SLACK = queue_module.TIMER_SLACK, -(10**9)
        self.config = QueueConfig(
            max_deliveries=MAX_DELIVERIES, retry=POLICY, ordered_by_key=self.ORDERED, max_in_flight=20,
            lease_ms=1000, at_most_once=self.AT_MOST_ONCE,
        )
        self.q = PartitionQueue(0, 0, self.config, rng=random.Random(1))
        # The journal the engine would write for these changes (QueueStore's operations).
        self.group = QueueGroup("g", "t", self.config, 0)
        self.group.partitions[0] = self.q
        self.store = _Holder({("g", "t"): self.group})
        self.store._journal.write(self.store._create_op(self.group))
        self.log_start = 0
        self.now = 1_000_000
        self.log: list[tuple[bytes | None, int]] = []  # (key, deliver_at)
        self.held: dict[int, tuple[int, int]] = {}  # offset -> (lease_id, expires)
        self.stale: list[tuple[int, int]] = []
        self.acked: set[int] = set()
        self.rejected: set[int] = set()
        self.dead: set[int] = set()
        self.restarts = 0

    def teardown(self):
        queue_module.MIN_CAPACITY = self._capacity
        queue_module.TIMER_SLACK = self._slack

    @rule(key=st.sampled_from([None, b"a", b"b"]), delay=st.sampled_from([0, 0, 500]))
    def produce(self, key, delay):
        self.log.append((key, self.now + delay if delay else 0))

    @rule()
    def admit(self):
        q = self.q
        while q.scan_offset < len(self.log) and q.room() > 0:
            key, at = self.log[q.scan_offset]
            if q.plain() and not at:  # a run of records with no delivery time at once
                end = q.scan_offset
                while end < len(self.log) and end - q.scan_offset < q.room() and not self.log[end][1]:
                    end += 1
                q.admit_run(q.scan_offset, end - q.scan_offset, self.now)
            else:
                q.admit(q.scan_offset, key=key, deliver_at_ms=at, append_time_ms=self.now)

    @rule(n=st.integers(1, 5), lease_ms=st.sampled_from([200, 1000]))
    def lease(self, n, lease_ms):
        self._expire()
        lease = self.q.lease(n, self.now, lease_ms)
        if lease is None:
            assert not len(self.q.pick(1))  # nothing was available
            return
        self.store.delivered(self.group, 0, lease, self.now)
        if lease.lease_id == 0:  # at-most-once: settled when handed out
            self.store.settled(self.group, 0, lease.offsets)
        assert len(lease) <= n
        assert [o for first, last, _ in lease.runs() for o in range(first, last + 1)] == lease.offsets.tolist()
        for offset, deliveries in lease.records():
            assert offset not in self.acked, "an acked record came back"
            old = self.held.get(offset)
            assert old is None or old[1] <= self.now, "leased twice at once"
            if old is not None:
                self.stale.append((offset, old[0]))
            assert 1 <= deliveries <= MAX_DELIVERIES
            if lease.lease_id == 0:
                self.acked.add(offset)
                continue
            self.held[offset] = (lease.lease_id, self.now + lease_ms)

    def _expire(self):
        expired = self.q.expire(self.now)
        for e in expired:
            self.held.pop(e.offset, None)
        retry = [e for e in expired if e.state != DEAD_LETTERING]
        dead = [e for e in expired if e.state == DEAD_LETTERING]
        if retry:
            self.store.retried(self.group, 0, retry, durable=False)
        if dead:
            self.store.dead(self.group, 0, dead)

    def _failed(self, e):
        if e.state == DEAD_LETTERING:
            self.store.dead(self.group, 0, [e])
        else:
            self.store.retried(self.group, 0, [e], durable=True)

    def _pick(self, i):
        live = sorted(o for o, (_, exp) in self.held.items() if exp > self.now)
        return live[i % len(live)] if live else None

    @rule(i=st.integers(0, 50))
    def ack(self, i):
        offset = self._pick(i)
        if offset is None:
            return
        self.q.ack(offset, self.held.pop(offset)[0], self.now)
        self.store.settled(self.group, 0, [offset])
        self.acked.add(offset)

    def _expected(self, first, last, lease_id):
        return sorted(o for o, (lid, exp) in self.held.items() if first <= o <= last and lid == lease_id
                      and exp > self.now)

    @rule(i=st.integers(0, 50), width=st.integers(0, 6))
    def ack_range(self, i, width):
        """Acks as ranges: every offset of the range the lease holds, and no other."""
        offset = self._pick(i)
        if offset is None:
            return
        lease_id = self.held[offset][0]
        expected = self._expected(offset - width // 2, offset + width, lease_id)
        acked = self.q.ack_range(offset - width // 2, offset + width, lease_id, self.now).tolist()
        assert acked == expected
        if acked:
            self.store.settled(self.group, 0, acked)
        for o in acked:
            del self.held[o]
            self.acked.add(o)
            self.stale.append((o, lease_id))

    @rule(i=st.integers(0, 50), width=st.integers(0, 6))
    def extend_range(self, i, width):
        offset = self._pick(i)
        if offset is None:
            return
        lease_id = self.held[offset][0]
        expected = self._expected(offset, offset + width, lease_id)
        extended, expires = self.q.extend_range(offset, offset + width, lease_id, self.now, 700)
        assert extended.tolist() == expected and expires == self.now + 700
        for o in expected:
            self.held[o] = (lease_id, expires)

    @rule(i=st.integers(0, 50), override=st.sampled_from([None, 0, 300]))
    def nack(self, i, override):
        offset = self._pick(i)
        if offset is None:
            return
        lease_id, _ = self.held.pop(offset)
        e = self.q.nack(offset, lease_id, self.now, delay_ms=override)
        self._failed(e)
        if e.state == DEAD_LETTERING:
            assert e.deliveries == MAX_DELIVERIES, "dead-lettered before the limit"
        else:
            assert e.deliveries < MAX_DELIVERIES
            low, high = (override, override) if override is not None else POLICY.bounds_ms(e.deliveries)
            assert low <= e.visible_at - self.now <= high, "backoff outside the policy's bounds"
        self.stale.append((offset, lease_id))

    @rule(i=st.integers(0, 50))
    def reject(self, i):
        offset = self._pick(i)
        if offset is None:
            return
        e = self.q.reject(offset, self.held.pop(offset)[0], self.now, reason="poison")
        assert e.state == DEAD_LETTERING
        self._failed(e)
        self.rejected.add(offset)

    @rule(i=st.integers(0, 50))
    def extend(self, i):
        offset = self._pick(i)
        if offset is None:
            return
        lease_id, _ = self.held[offset]
        self.held[offset] = (lease_id, self.q.extend(offset, lease_id, self.now, 1000))

    @precondition(lambda self: self.stale)
    @rule(i=st.integers(0, 50))
    def stale_ack_changes_nothing(self, i):
        offset, lease_id = self.stale[i % len(self.stale)]
        before = self.q.counts()
        try:
            self.q.ack(offset, lease_id, self.now)
        except LeaseExpired:
            assert self.q.counts() == before
        else:
            raise AssertionError("a stale lease was accepted")

    @rule()
    def drain_dead_letters(self):
        while self.q.to_dead_letter:
            offset = self.q.to_dead_letter.popleft()
            e = self.q.entry(offset)
            if e is None or e.state != DEAD_LETTERING:
                continue  # gone since (retention): the engine skips it too
            assert offset in self.rejected or e.deliveries == MAX_DELIVERIES
            self.q.dead_lettered(offset)
            self.store.settled(self.group, 0, [offset], kind="d")
            self.dead.add(offset)

    @rule(compact=st.booleans())
    def restart(self, compact):
        """Replay into a fresh queue either a snapshot (as the journal's compaction
        writes it) or every operation written so far, and re-admit from the log:
        leases in flight are void, the rest stays. Both must give the same state."""
        snapshot = self.store._snapshot()
        journal = self.store._journal.ops
        fresh = self._replayed(snapshot if compact else journal)
        other = self._replayed(journal if compact else snapshot)
        before = {e.offset: (e.deliveries, e.state) for e in self.q.entries()}
        pending_dead = set(self.q.to_dead_letter) | {o for o, (_, st) in before.items() if st == DEAD_LETTERING}
        self.group = fresh.groups[("g", "t")]
        self.q = self.group.partitions[0]
        if compact:
            self.store._journal.ops = [json.loads(json.dumps(op)) for op in snapshot]
        self.store.groups = fresh.groups
        self.restarts += 1
        self.q.rng = random.Random(1000 + self.restarts)  # a new process: new lease ids
        self.q._next_lease_id = self.q.rng.getrandbits(62) + 1
        for offset, (lease_id, _) in self.held.items():
            self.stale.append((offset, lease_id))
        self.held.clear()
        self.admit()
        for offset, (deliveries, _) in before.items():
            if self.q.entry(offset) is not None:
                assert self.q.entry(offset).deliveries == deliveries, "a delivery count changed"
        assert set(self.q.to_dead_letter) >= {o for o in pending_dead if self.q.entry(o) is not None}
        # The journal's operations and the snapshot rebuild the same window.
        q2 = other.groups[("g", "t")].partitions[0]
        while q2.scan_offset < self.q.scan_offset:
            key, at = self.log[q2.scan_offset]
            q2.admit(q2.scan_offset, key=key, deliver_at_ms=at, append_time_ms=self.now)
        assert (q2.start_offset, q2.scan_offset) == (self.q.start_offset, self.q.scan_offset)
        # Retries already due may wait for the timers (a visible time in the past).
        assert self.q.expire(self.now) == [] and q2.expire(self.now) == []
        assert _view(q2) == _view(self.q), "the journal and the snapshot disagree"
        s, s2 = self.q.stats, q2.stats
        assert (s.acked, s.dead_lettered, s.lost_to_retention) == (s2.acked, s2.dead_lettered, s2.lost_to_retention)

    def _replayed(self, ops) -> QueueStore:
        fresh = _Holder({})
        for op in ops:
            fresh._replay(json.loads(json.dumps(op)))
        return fresh

    @rule(k=st.integers(1, 8))
    def retention(self, k):
        """Retention deletes the oldest records: those not settled are lost, counted."""
        self.log_start = min(len(self.log), self.log_start + k)
        q = self.q
        if q.scan_offset < self.log_start or q.start_offset < self.log_start:
            before = q.stats.lost_to_retention
            q.skip_to(self.log_start)
            self.store.skipped(self.group, 0, q.start_offset, q.stats.lost_to_retention - before)
        for offset in [o for o in self.held if o < self.log_start]:
            self.stale.append((offset, self.held.pop(offset)[0]))

    @rule(i=st.integers(0, 50))
    def seek(self, i):
        """Seek: records from the target on are delivered again, leases are void."""
        target = self.log_start + i % (len(self.log) - self.log_start + 1)
        self.q.seek(target)
        self.store.sought(self.group, 0, target)
        for offset, (lease_id, _) in self.held.items():
            self.stale.append((offset, lease_id))
        self.held.clear()
        self.acked = {o for o in self.acked if o < target}
        self.dead = {o for o in self.dead if o < target}
        self.rejected = {o for o in self.rejected if o < target}

    @rule(ms=st.sampled_from([100, 700]))
    def time_passes(self, ms):
        """The clock moves on before the owner's timers run: leases past their end are
        still LEASED in the queue, and settling them, alone or in a range, is refused
        and changes nothing."""
        self.now += ms
        before = self.q.counts()
        for offset, (lease_id, expires) in sorted(self.held.items()):
            if expires > self.now:
                continue
            assert self.q.ack_range(offset, offset, lease_id, self.now).tolist() == []
            assert self.q.extend_range(offset, offset, lease_id, self.now, 1000)[0].tolist() == []
            try:
                self.q.ack(offset, lease_id, self.now)
            except LeaseExpired:
                pass
            else:
                raise AssertionError("an expired lease was accepted")
        assert self.q.counts() == before

    @rule(ms=st.sampled_from([50, 200, 600, 1500]))
    def tick(self, ms):
        self.now += ms
        self._expire()
        for e in self.q.entries():  # every due timer acted
            assert not (e.state in (LEASED, WAITING) and e.visible_at <= self.now), e

    @invariant()
    def window_is_consistent(self):
        q = self.q
        entries = {e.offset: e for e in q.entries()}
        assert q.open == len(entries)
        assert len(entries) - q.blocked <= self.config.max_in_flight
        assert q.blocked == sum(e.state == BLOCKED for e in entries.values())
        assert q.scan_offset - q.start_offset <= self.config.max_in_flight * 20
        for offset in range(q.start_offset, q.scan_offset):
            assert (offset in entries) != q.is_settled(offset), offset
        assert all(q.is_settled(o) or o in entries for o in self.acked | self.dead)
        assert not (set(entries) & self.acked)
        counts = q.counts()
        assert sum(counts.values()) == len(entries)
        assert counts["leased"] == sum(e.state == LEASED for e in entries.values())

    @invariant()
    def ordered_keys_have_one_record_out(self):
        active: dict[bytes, int] = {}
        for e in self.q.entries():
            if e.key is not None and e.state != BLOCKED:
                assert e.key not in active, f"key {e.key} has {active[e.key]} and {e.offset} out"
                active[e.key] = e.offset

    @invariant()
    def leases_match_the_model(self):
        for e in self.q.entries():
            if e.state == LEASED and e.visible_at > self.now:
                assert self.held.get(e.offset, (None,))[0] == e.lease_id


class _Recorder:
    """The journal's write, keeping the operations (as JSON gives them back)."""

    def __init__(self) -> None:
        self.ops: list[dict] = []

    def write(self, op: dict, *, durable: bool = True) -> None:
        self.ops.append(json.loads(json.dumps(op)))


def _Holder(groups) -> QueueStore:
    """A QueueStore with a journal that only records: the state its snapshot and
    replay work on."""
    store = QueueStore.__new__(QueueStore)
    store.groups = groups
    store.rng = random.Random(0)
    store._journal = _Recorder()
    return store


def _view(q: PartitionQueue) -> dict:
    """What a restart must keep of each unsettled record (not leases: they are void)."""
    return {e.offset: (e.state if e.state != LEASED else "leased", e.deliveries, e.first_delivery_ms,
                       e.last_delivery_ms, e.visible_at if e.state in (WAITING, BLOCKED) else 0)
            for e in q.entries()}


class UnorderedQueueMachine(QueueMachine):
    """The same rules on a group without ordered keys: records are admitted a run at
    a time (``admit_run``) wherever they have no delivery time."""

    ORDERED = False


class AtMostOnceQueueMachine(QueueMachine):
    """At-most-once: records are settled when handed out, and never come again."""

    ORDERED = False
    AT_MOST_ONCE = True


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestUnorderedQueueMachine = UnorderedQueueMachine.TestCase
TestUnorderedQueueMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestAtMostOnceQueueMachine = AtMostOnceQueueMachine.TestCase
TestAtMostOnceQueueMachine.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
