"""PartitionQueue edge cases found in review: retention, restarts, ordered keys."""

from __future__ import annotations

import json
import random

from consumer_groups.queue.store import QueueGroup, QueueStore
from consumer_groups.queue.window import PartitionQueue, QueueConfig

NOW = 1_000_000


def _store(groups) -> QueueStore:
    store = QueueStore.__new__(QueueStore)
    store.groups, store.rng = groups, random.Random(0)
    return store


def restarted(q: PartitionQueue) -> PartitionQueue:
    """``q`` after a restart: its snapshot replayed into a fresh queue (nothing admitted)."""
    group = QueueGroup("g", "t", q.config, 0)
    group.partitions[q.partition] = q
    fresh = _store({})
    for op in _store({("g", "t"): group})._snapshot():
        fresh._replay(json.loads(json.dumps(op)))
    return fresh.groups[("g", "t")].partitions[q.partition]


def test_retention_after_a_restart_does_not_count_acked_records_as_lost():
    q = PartitionQueue(0, 0, QueueConfig(), rng=random.Random(1))
    q.admit_run(0, 10, NOW)
    lease = q.lease(10, NOW, 30_000)
    q.ack_range(5, 9, lease.lease_id, NOW)  # 0..4 stay leased
    q = restarted(q)
    assert q.scan_offset == 0 and q.settled_ahead == {5, 6, 7, 8, 9}
    q.skip_to(10)  # retention deletes 0..9 before anybody received again
    assert q.stats.lost_to_retention == 5
    assert q.start_offset == q.scan_offset == 10 and not q.remembered and not q.settled_ahead


def test_timers_of_settled_leases_do_not_pile_up_until_they_expire():
    """One lease per receive, acked at once, with a long lease: the window holds one
    record at a time, and so (near enough) must the timer heap."""
    q = PartitionQueue(0, 0, QueueConfig(lease_ms=12 * 3600 * 1000), rng=random.Random(1))
    for i in range(20_000):
        q.admit_run(i, 1, NOW)
        lease = q.lease(1, NOW + i, 12 * 3600 * 1000)
        q.ack_range(i, i, lease.lease_id, NOW + i)
    assert len(q._timers) < 5_000


def test_damaged_records_are_settled_as_lost_in_the_window_and_ahead_of_it():
    q = PartitionQueue(0, 0, QueueConfig(max_in_flight=10), rng=random.Random(1))
    q.admit_run(0, 10, NOW)
    lease = q.lease(3, NOW, 30_000)  # 0..2 leased, 3..9 available
    # 5..14 unreadable: 5..9 are in the window, 10..14 not admitted yet.
    assert q.skip_damaged(5, 14) == [(5, 9), (10, 14)]
    assert q.stats.lost_to_corruption == 10 and q.scan_offset == 15
    assert sorted(q.pick(10).tolist()) == [3, 4]  # nothing damaged is handed out
    q.ack_range(0, 2, lease.lease_id, NOW)
    again = restarted(q)
    assert again.stats.lost_to_corruption == 10 and again.settled_ahead == set(range(5, 15))
    # Wider than the window can span while records before it are unsettled: later.
    assert q.skip_damaged(15, 15 + 10 * 20) == []
    assert q.scan_offset == 15
    q.ack_range(3, 4, q.lease(2, NOW, 30_000).lease_id, NOW)
    assert q.skip_damaged(15, 15 + 10 * 20) == [(15, 215)]  # an empty window restarts past it
    assert q.start_offset == q.scan_offset == 216 and q.stats.lost_to_corruption == 211
