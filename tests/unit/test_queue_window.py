"""PartitionQueue edge cases found in review: retention, restarts, ordered keys."""

from __future__ import annotations

import json
import random

from consumer_groups.queue import PartitionQueue, QueueConfig
from consumer_groups.queue_store import QueueGroup, QueueStore

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
